"""Ray and device plumbing shared by every flow.

Flows run on a `RayTaskRunner`: `RAY_ADDRESS` (e.g. `ray://head:10001` or `auto`) joins an
existing cluster, otherwise a local Ray instance is started with this machine's CPUs (and
its GPUs when present). Heavy tasks are submitted inside `heavy(resources, stage)`, i.e. under
`remote_options(num_gpus=..., num_cpus=...)` of the flow's `Resources` with that stage's
overrides (`resources.stages`: paper-size distillation on a whole GPU while experts pack four
to a GPU); inside the task, `task_device()` picks CUDA when Ray assigned a GPU and the CPU
otherwise, and pins torch's thread count to the CPUs Ray granted, so that two tasks sharing a
2-core machine do not oversubscribe it.

Ray workers must report to the same Prefect server as the flow, so the Prefect and
distillery environment variables are forwarded to them explicitly.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

# Forwarded to every Ray worker: without PREFECT_API_URL a worker would start its own
# throw-away Prefect server and its task runs would never reach the UI.
FORWARDED_ENV_PREFIXES = ("PREFECT_", "DISTILLERY_", "HF_", "OMP_NUM_THREADS")


# The stages whose tasks run under `heavy`: the names `Resources.stages` accepts. They are the
# artifact stages those tasks publish (tasks/*.py *_STAGE), written out here because this module
# sits below them.
HEAVY_STAGES: tuple[str, ...] = (
    "experts",  # expert training (experts, distill-tm, pipeline)
    "distill-tm",  # trajectory-matching distillation
    "eval",  # evaluation of distilled and random real sets (baseline, distill-tm)
    "eval-real",  # evaluation on the full real set (DD-Ranking's reference)
    "surrogate",  # DP4TL's surrogate training
    "selection",  # DP4TL's class or sample selection
    "transfer",  # DP4TL's pretrain-then-transfer arms (prune-eval, pipeline)
    "ssl-teacher",  # the Barlow Twins teacher (distill-krr, pipeline)
    "krr-st",  # KRR-ST distillation
    "krr-eval",  # KRR-ST's and its baselines' pretrain-then-transfer runs
)


class StageResources(BaseModel):
    """What one stage asks instead of the flow's defaults; unset fields keep them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_gpus: float | Literal["auto"] | None = Field(
        None, description="GPUs per task of this stage (fractions pack tasks on one GPU); unset: the flow's."
    )
    num_cpus: float | None = Field(None, gt=0, description="CPU cores per task of this stage; unset: the flow's.")


class Resources(BaseModel):
    """Ray resources for one heavy task (a training run, an expert, an evaluation)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_gpus: float | Literal["auto"] = Field(
        "auto",
        description="GPUs per task; fractions pack several small jobs on one GPU. "
        "'auto' = 1 when the Ray cluster has GPUs, else 0.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPU cores per task (also torch's thread count).")
    serial_cpus: float | None = Field(
        None,
        gt=0,
        description="CPU cores (and torch threads) for the stages a flow runs alone, one after another "
        "(distill-krr's SSL teacher and KRR-ST distillation): nothing runs beside them, so more threads "
        "finish them sooner; default num_cpus.",
    )

    stages: dict[str, StageResources] = Field(
        default_factory=dict,
        description="Per-stage overrides, e.g. {distill-tm: {num_gpus: 1}} to give distillation a whole GPU "
        "while experts pack at num_gpus 0.25. Stages: " + ", ".join(HEAVY_STAGES) + ".",
    )

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: dict[str, StageResources]) -> dict[str, StageResources]:
        unknown = sorted(set(stages) - set(HEAVY_STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}; valid: {', '.join(HEAVY_STAGES)}")
        return stages

    @model_serializer(mode="wrap")
    def _omit_empty_stages(self, handler: SerializerFunctionWrapHandler) -> Any:
        # configs written before per-stage resources existed dump (and display) as they did
        data = handler(self)
        if isinstance(data, dict) and not data.get("stages"):
            data.pop("stages", None)
        return data

    def serial(self) -> Resources:
        """The resources of a stage that runs alone: serial_cpus cores when set."""
        if self.serial_cpus is None:
            return self
        return self.model_copy(update={"num_cpus": self.serial_cpus, "serial_cpus": None})

    def at(self, stage: str) -> Resources:
        """The request of one task of `stage`: the flow's, with that stage's overrides (no `stages` left)."""
        if stage not in HEAVY_STAGES:
            raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(HEAVY_STAGES)}")
        override = self.stages.get(stage)
        update: dict[str, Any] = {"stages": {}}
        if override is not None:
            update |= {k: v for k, v in override.model_dump().items() if v is not None}
        return self.model_copy(update=update)

    def resolved_gpus(self) -> float:
        """The GPU request after resolving 'auto' against the connected Ray cluster.

        A GPU request that the cluster cannot satisfy is refused here: Ray would otherwise
        queue the task as infeasible and the flow would wait forever.
        """
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus > 0 else 0.0
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 or 'auto', got {self.num_gpus}")
        if self.num_gpus > cluster_gpus:
            raise ValueError(
                f"tasks request num_gpus={self.num_gpus} but the Ray cluster has {cluster_gpus} GPUs; "
                "set resources.num_gpus to 0 or 'auto', or connect to a GPU cluster via RAY_ADDRESS"
            )
        return float(self.num_gpus)

    def check_feasible(self) -> dict[str, float]:
        """The Ray options for one task, refused up front when no node of the cluster could run it.

        Ray queues an infeasible request forever without an error (a flow asking 4 CPUs of a
        2-core machine just hangs), so the largest node's CPUs and GPUs are checked here,
        before any stage starts.
        """
        import ray

        gpus = self.resolved_gpus()
        if not ray.is_initialized():
            return {"num_gpus": gpus, "num_cpus": self.num_cpus}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        best_cpu = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
        best_gpu = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
        for name, cpus in (("num_cpus", self.num_cpus), ("serial_cpus", self.serial_cpus)):
            if cpus is not None and cpus > best_cpu:
                raise ValueError(
                    f"tasks request {name}={cpus:g} but the largest Ray node has {best_cpu:g} CPUs "
                    f"({len(nodes)} node(s)); set resources.{name} <= {best_cpu:g}, "
                    "or join a bigger cluster via RAY_ADDRESS"
                )
        if gpus > best_gpu:
            raise ValueError(
                f"tasks request num_gpus={gpus:g} but the largest Ray node has {best_gpu:g} GPUs; "
                "set resources.num_gpus to 0 or 'auto', or connect to a GPU cluster via RAY_ADDRESS"
            )
        for stage in self.stages:  # every stage's request, before the first stage starts
            try:
                self.at(stage).check_feasible()
            except ValueError as e:
                raise ValueError(f"resources.stages[{stage!r}]: {e}") from None
        return {"num_gpus": gpus, "num_cpus": self.num_cpus}


def tie_to_worker(poll_s: float = 2.0) -> bool:
    """Stop this flow-run process when the Prefect worker that started it dies; True when armed.

    A process worker starts each flow run as a child process. When the worker is killed, the
    child used to run on unsupervised, publish everything, and then be marked Crashed by the
    server: a state that contradicts what it did. Here the run stops with its worker instead:
    a daemon thread notices that the parent process is gone (the child is re-parented) and
    sends SIGTERM to this process, which Prefect records as a crash. Stages already published
    stay valid (publishing is atomic), long loops resume from their checkpoints on the next
    run, and local Ray goes down with its driver. Armed only in a worker-started run
    (`PREFECT__FLOW_RUN_ID` set by the worker), never in a test or a notebook.
    """
    import signal
    import threading
    import time

    if "PREFECT__FLOW_RUN_ID" not in os.environ or os.environ.get("DISTILLERY_SURVIVE_WORKER") == "1":
        return False
    parent = os.getppid()
    if parent == 1:
        return False  # already orphaned (or started by init): nothing to watch

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="distillery-worker-watch", daemon=True).start()
    return True


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def _quiet_token_auth_notice() -> None:
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in log.filters):
        log.addFilter(_DropTokenAuthNotice())


def ray_init_kwargs() -> dict[str, Any]:
    """Arguments for `ray.init`: local resources unless joining a cluster via RAY_ADDRESS.

    `DISTILLERY_RAY_NUM_GPUS` declares logical GPUs (used to test GPU scheduling on a CPU
    machine); `DISTILLERY_RAY_NUM_CPUS` caps the local instance; `DISTILLERY_RAY_DASHBOARD=1`
    starts the Ray dashboard (off by default: it costs ~1 GiB and seconds on small boxes).
    """
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": _forwarded_env()},
        "ignore_reinit_error": True,
        "log_to_driver": True,
    }
    if not os.environ.get("RAY_ADDRESS"):
        # Ray 2.60's gRPC servers listen on every interface whatever the node IP (measured: gcs_server,
        # raylet and core workers bind '::' even with _node_ip_address=127.0.0.1), so the token
        # authentication Ray turns on for a local cluster is what keeps other hosts out. Keep it,
        # and drop only the warning it logs on every run.
        _quiet_token_auth_notice()
        # "local" starts a private instance even when `ray start` left a cluster on this host,
        # which ray.init() would otherwise join (and then refuse num_cpus).
        kwargs["address"] = "local"
        kwargs["num_cpus"] = int(os.environ.get("DISTILLERY_RAY_NUM_CPUS", os.cpu_count() or 1))
        if "DISTILLERY_RAY_NUM_GPUS" in os.environ:
            kwargs["num_gpus"] = float(os.environ["DISTILLERY_RAY_NUM_GPUS"])
        kwargs["include_dashboard"] = os.environ.get("DISTILLERY_RAY_DASHBOARD", "0") == "1"
    return kwargs


def ray_task_runner():
    """The task runner every flow uses: a Ray cluster from RAY_ADDRESS, or local Ray."""
    from prefect_ray import RayTaskRunner

    return RayTaskRunner(address=os.environ.get("RAY_ADDRESS") or None, init_kwargs=ray_init_kwargs())


@contextmanager
def heavy(resources: Resources, stage: str) -> Iterator[dict[str, float]]:
    """Submit the tasks inside this block as Ray tasks with `stage`'s GPU/CPU request (`Resources.at`)."""
    from prefect_ray.context import remote_options

    options = resources.at(stage).check_feasible()
    with remote_options(**options):
        yield options


def task_device() -> str:
    """Device for the current task: CUDA if Ray assigned this task a GPU, else CPU.

    Also sets torch's intra-op threads to the CPUs Ray granted the task. Outside Ray (a
    plain function call, a notebook) falls back to CUDA when visible.
    """
    import torch

    try:
        import ray

        in_ray = ray.is_initialized() and ray.get_runtime_context().worker.mode == 1
    except Exception:  # Ray not importable or not running: plain local call
        in_ray = False
    if in_ray:
        assigned = ray.get_runtime_context().get_assigned_resources()
        cpus = assigned.get("CPU", 0)
        if cpus >= 1:
            torch.set_num_threads(int(cpus))
        gpu_ids = ray.get_gpu_ids()
        # Ray sets CUDA_VISIBLE_DEVICES to the granted GPUs, so the first visible one is ours.
        if gpu_ids and torch.cuda.is_available():
            return "cuda"
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"

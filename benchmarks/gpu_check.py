"""One GPU check in at most 8 minutes: CUDA tests, every paper preset's first iterations, packing, precision.

A GPU machine is lent only now and then, for minutes, so everything worth knowing from one
is prepared here and runs as one command. Each check runs in its own subprocess under its
own wall-clock budget (a crash, an out-of-memory error or a hang costs that check alone),
prints one JSON line, and the run ends with a summary line whose `goal*` keys say whether
everything passed within the time allowed:

  gpu_tests          pytest -m gpu tests/gpu: device from Ray's assignment (num_gpus 1, 0.25
                     and 0), DSA determinism on CUDA, bit-identical expert resume on CUDA
  tm_cifar10_ipc10   distill-tm `paper` (MTT CIFAR-10, IPC 10, syn_steps 30, unrolled) on
                     real CIFAR-10: s/iteration and peak GPU memory
  tm_cifar100_ipc50  distill-tm `paper-cifar100` (IPC 50, syn_steps 80, batch_syn 125,
                     constant memory) on CIFAR-100-shaped random data: the setting for which
                     MTT needed two 24 GB GPUs; goal: it fits in 24 GiB
  krr_st             KRR-ST at the CIFAR-100 paper size: 1000 synthetic images, ConvNet
                     128-256-512 pool of 10, real batch 1024, ResNet-18 teacher
  precision          the matching gradient (CIFAR-10 IPC 10 shape) under the core's precisions
                     fp32, tf32 and bf16 (distill.precision.precision_context, as matching,
                     experts and evaluation apply their `precision` option), torch's defaults,
                     and fp32 with the native layers instead of the fast ones (fused instance
                     norm, strided-add pooling): time and relative difference to fp32.
  expert_packing     experts/hour with 4 experts per GPU (num_gpus=0.25) and with 1 per GPU,
                     through the real path: Prefect task `train-expert` on the RayTaskRunner
                     under `tasks.runtime.heavy(Resources(...), "experts")`, after the `dataset` stage
                     (its Prefect server starts in the background while the other checks run)

Trajectory matching needs experts: the checks write random-walk trajectories from a fresh
net (a matching iteration's cost does not depend on the values) and lower max_start_epoch
to 1 (the start-epoch draw does not change an iteration's cost either). KRR-ST's pool
warm-up is shortened to online_iterations=100 (paper 1000); `setup_and_first_iter_s`
includes it.

`--smoke` (the default without CUDA) runs every check at a tiny size on the CPU, meant to
take under 2 minutes on 2 idle cores (goal_under_2_min; other work on the box slows it and
its budgets leave room for that): GPU-only figures read "skipped: no CUDA" but every code path runs (Ray with one
logical GPU for the packing). tests/gpu/test_gpu_check_smoke.py runs it, so it cannot rot.

Output: one JSON line per check, then the summary, on stdout and in --out
(test-output/gpu_check.jsonl). A full run (and a smoke run with --record) appends the
summary, every check's line, git revision, device name, thread count and /proc/loadavg
to benchmarks/records/gpu_check.jsonl; smoke records carry "preset": "smoke".

    scripts/gpu_check.sh                 # on a CUDA machine: full sizes, <= 8 min on one H200
    scripts/gpu_check.sh --smoke         # tiny sizes on the CPU, < 2 min on 2 cores
    .venv/bin/python benchmarks/gpu_check.py --smoke --only precision,krr_st --out /tmp/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import append_flat_record, loadavg  # noqa: E402

DATA = Path(os.environ.get("DISTILLERY_DATA", ROOT.parent / "shared" / "data"))
NO_CUDA = "skipped: no CUDA"
GIB = 2**30

# Wall-clock budgets in seconds. The full run must end within 8 minutes on one H200 (GPU
# time is lent 15 minutes at a time, start-up included, and must leave room for a re-run);
# the smoke run within 2 minutes on 2 CPU cores. A check gets min(its budget, what is left).
# The smoke budgets are generous so that a box loaded by other work still finishes every check;
# whether the smoke run met its 2 minutes is the summary's goal_under_2_min.
# A check over its budget gets SIGTERM and up to 15 s to report what it measured, hence 455.
TOTAL_BUDGET_S = {"full": 455, "smoke": 240}
BUDGET_S = {
    "full": {
        "gpu_tests": 90,
        "expert_packing": 115,
        "tm_cifar10_ipc10": 45,
        "tm_cifar100_ipc50": 80,
        "krr_st": 70,
        "precision": 40,
    },
    "smoke": {
        "gpu_tests": 60,
        "expert_packing": 120,
        "tm_cifar10_ipc10": 45,
        "tm_cifar100_ipc50": 45,
        "krr_st": 45,
        "precision": 45,
    },
}

# Sizes per check. "full" follows the paper presets (deployments/presets/*.yaml) wherever the
# quantity measured depends on it; "smoke" keeps each code path and shrinks every dimension.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "expert_packing": {
            "data": {"train_per_class": 1000, "test_per_class": 100},  # 10k CIFAR-10 images per expert epoch
            "net_kwargs": {"width": 128, "depth": 3},  # the experts `paper` preset's ConvNet-3
            "epochs": 2,
            "experts": {"packed": 4, "single": 4},
            "num_cpus": 2,
        },
        "tm_cifar10_ipc10": {"preset": "paper", "ipc": 10, "iterations": 4},  # 1 warm-up + 3 timed
        "tm_cifar100_ipc50": {"preset": "paper-cifar100", "ipc": 50, "iterations": 3},
        "krr_st": {
            "source": 50_000,
            "image_size": 32,  # CIFAR-100's train split shape
            "krr": {
                "num_images": 1000,
                "net_kwargs": {"widths": [128, 256, 512]},
                "outer_lr": 1e-4,
                "online_iterations": 100,
                "outer_steps": 4,
            },
        },
        "precision": {"width": 128, "ipc": 10, "syn_steps": 30, "repeats": 2},
    },
    "smoke": {
        "expert_packing": {
            "data": {"classes": [0, 1, 2], "train_per_class": 20, "test_per_class": 10},
            "net_kwargs": {"width": 8, "depth": 2},
            # every GPU task starts its own worker process (seconds of imports on 2 cores), so the
            # smoke size runs 2 packed experts (and the probe) side by side and 1 alone
            "epochs": 1,
            "experts": {"packed": 2, "single": 1},
            "num_cpus": 0.5,
        },
        "tm_cifar10_ipc10": {
            "preset": "paper",
            "ipc": 10,
            "iterations": 2,
            "shrink": {"classes": 3, "ipc": 2, "syn_steps": 3, "width": 8, "image_size": 16},
        },
        "tm_cifar100_ipc50": {
            "preset": "paper-cifar100",
            "ipc": 50,
            "iterations": 2,
            "shrink": {"classes": 4, "ipc": 3, "syn_steps": 4, "batch_syn": 5, "width": 8, "image_size": 16},
        },
        "krr_st": {
            "source": 96,
            "image_size": 16,
            "krr": {
                "num_images": 12,
                "net_kwargs": {"widths": [4, 8]},
                "num_models": 2,
                "online_iterations": 4,
                "outer_steps": 2,
                "real_batch": 16,
            },
        },
        "precision": {"width": 8, "ipc": 2, "syn_steps": 3, "repeats": 1},
    },
}


def _log(message: str) -> None:
    """Progress on stderr, which goes to the check's log file (stdout carries only the JSON)."""
    print(f"{time.strftime('%H:%M:%S')} gpu_check: {message}", file=sys.stderr, flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _reset_gpu_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_gpu_mib": NO_CUDA, "peak_rss_mib": _peak_rss_mib()}
    torch.cuda.synchronize()
    return {
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
        "peak_rss_mib": _peak_rss_mib(),
    }


def _presets(flow: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "deployments" / "presets" / f"{flow}.yaml").read_text())


def _cifar10() -> Path | None:
    path = DATA / "cifar10"
    return path if path.exists() else None


# What a check has measured so far: reported even when its budget runs out mid-way.
_PARTIAL: dict[str, Any] = {}


class _Timer:
    """A progress callback that stamps each iteration; intervals after the first are steady-state."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def __call__(self, step: int, total: int, **metrics: Any) -> None:
        self.stamps.append(time.perf_counter())
        _PARTIAL.update(self.summary(), partial_at_iteration=f"{step}/{total}")

    def summary(self) -> dict[str, Any]:
        if not self.stamps:
            return {}
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        out = {"setup_and_first_iter_s": round(self.stamps[0] - self.start, 3)}
        out["s_per_iter"] = round(statistics.median(steps), 4) if steps else None
        out["timed_iterations"] = len(steps)
        return out


# ---------------------------------------------------------------- checks (each runs in its own process)


def check_gpu_tests(p: dict, size: str) -> dict[str, Any]:
    """pytest -m gpu tests/gpu in a subprocess; pass/fail/skip counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "tests/gpu",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            "-o",
            "junit_family=xunit2",
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not junit.exists():
            raise RuntimeError(
                f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
            )
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        cases = suite.findall("testcase")
    problems = [(c, c.find("failure") if c.find("failure") is not None else c.find("error")) for c in cases]
    failed = [f"{c.get('name')}: {bad.get('message', '')[:300]}" for c, bad in problems if bad is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    reasons = sorted({c.find("skipped").get("message", "")[:200] for c in skipped})
    row = {
        "tests": len(cases),
        "passed": len(cases) - len(failed) - len(skipped),
        "failed": len(failed),
        "skipped": len(skipped),
        "pytest_exit": proc.returncode,
        "failures": failed,
        "skip_reasons": reasons,
        "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "",
    }
    if failed or proc.returncode not in (0, 5):
        row["status"] = "failed"
    elif cases and len(skipped) == len(cases):
        row["status"] = "skipped"
    return row


def _packing_flow(data, cfgs, num_cpus: float, store: str) -> list[dict[str, Any]]:
    """Inside a Prefect flow on the RayTaskRunner: the dataset stage, then each (label, num_gpus, cfg) round.

    A probe task submitted after the packed round's experts reports the device the task layer
    picks under num_gpus=0.25; it queues behind them when they fill the GPU, so it does not
    delay them. The dataset stage runs in this process (a direct task call), not on Ray.
    """
    from prefect import task

    from tasks.datasets import materialize_dataset
    from tasks.experts import train_one_expert
    from tasks.runtime import Resources, heavy, task_device

    @task(name="gpu-check-probe")
    def probe() -> dict[str, Any]:
        import ray

        return {
            "device": task_device(),
            "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    start = time.perf_counter()
    dataset = materialize_dataset(data, store)
    rounds = [{"label": "dataset stage", "wall_s": round(time.perf_counter() - start, 2)}]
    _PARTIAL["rounds"] = rounds
    _log(f"dataset stage done in {rounds[0]['wall_s']} s")
    for number, (label, gpus, cfg) in enumerate(cfgs):
        with heavy(Resources(num_gpus=gpus, num_cpus=num_cpus), "experts"):
            start = time.perf_counter()
            futures = [train_one_expert.submit(dataset, cfg, i, store) for i in range(cfg.num_experts)]
            probed = probe.submit() if number == 0 else None
        results = [f.result() for f in futures]
        wall = time.perf_counter() - start
        seen = probed.result() if probed is not None else {}
        _log(f"round {label}: {len(results)} experts in {wall:.1f} s")
        rounds.append(
            {
                "label": label,
                "num_gpus": gpus,
                "experts": len(results),
                "wall_s": round(wall, 2),
                "experts_per_hour": round(3600 * len(results) / wall, 1),
                "train_s_per_expert": round(statistics.mean(r["seconds"] for r in results), 2),
                "train_s_per_epoch": round(statistics.mean(r["seconds"] for r in results) / cfg.epochs, 3),
                "test_acc_mean": round(statistics.mean(r["test_acc"] for r in results), 4),
                **seen,
            }
        )
    return rounds


def _prefect_api():
    """Use PREFECT_API_URL when set (e.g. the test session's server), else start a temporary server.

    The temporary one is Prefect's own (uvicorn, no UI) with its database in a fresh PREFECT_HOME,
    started in this check's process group, so the orchestrator's group kill ends it on overrun.
    Returns the server to stop, or None.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gpu-check-prefect-")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=90)
    os.environ["PREFECT_API_URL"] = server.api_url  # forwarded to Ray workers by tasks.runtime
    return server


def _small_npz(path: Path, classes: int = 3, per_class: int = 20, test_per_class: int = 10) -> str:
    """A CIFAR-shaped .npz of random images, for machines without ../shared/data."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        arrays[f"x_{split}"] = rng.integers(0, 256, size=(classes * n, 32, 32, 3), dtype=np.uint8)
        arrays[f"y_{split}"] = np.repeat(np.arange(classes), n)
    np.savez(path, **arrays)
    return str(path)


def check_expert_packing(p: dict, size: str) -> dict[str, Any]:
    """Experts/hour at num_gpus=0.25 (4 per GPU) and num_gpus=1, through Prefect + Ray."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if not _cuda():
        # One logical GPU: Ray schedules num_gpus=0.25 / 1 exactly as on a GPU box; tasks run on CPU.
        os.environ["DISTILLERY_RAY_NUM_GPUS"] = "1"
        os.environ.setdefault("DISTILLERY_RAY_NUM_CPUS", str(min(os.cpu_count() or 2, 2)))
    start = time.perf_counter()
    server = _prefect_api()
    server_s = round(time.perf_counter() - start, 2) if server is not None else 0.0
    _log(f"Prefect API at {os.environ['PREFECT_API_URL']} ({'started' if server else 'reused'}, {server_s} s)")
    try:
        from prefect import flow

        from distill.data import DataConfig
        from distill.experts import ExpertConfig
        from tasks.runtime import ray_task_runner

        with tempfile.TemporaryDirectory(prefix="gpu-check-store-") as store:
            real = _cifar10()
            if real is not None:
                data = DataConfig(source=str(real), **p["data"])
            else:
                data = DataConfig(source=_small_npz(Path(store) / "random.npz"), test_per_class=10)
            base = {"recipe": "mtt", "net": "convnet", "net_kwargs": p["net_kwargs"], "epochs": p["epochs"]}
            # A different seed per round: each round is a different expert set, never a cache hit.
            n = p["experts"]
            cfgs = [
                ("4 per GPU", 0.25, ExpertConfig(**base, num_experts=n["packed"], seed=1)),
                ("1 per GPU", 1.0, ExpertConfig(**base, num_experts=n["single"], seed=2)),
            ]
            run = flow(name="gpu-check-packing", task_runner=ray_task_runner(), log_prints=False)(_packing_flow)
            rounds = run(data, cfgs, p["num_cpus"], store)
    finally:
        if server is not None:
            server.stop()
    by = {r["label"]: r for r in rounds}
    rounds = [{"label": "prefect server start", "wall_s": server_s}] + rounds
    packed, single = by["4 per GPU"], by["1 per GPU"]
    row = {
        "rounds": rounds,
        "note": "Ray starts a fresh worker process for every GPU task (its max_calls=1 default for GPU "
        "tasks), so each expert pays process start, imports and dataset decoding in its wall time",
        "data": str(data.source) if real is None else f"cifar10 {p['data']}",
        "expert": {"net_kwargs": p["net_kwargs"], "epochs": p["epochs"]},
        "experts_per_hour_4_per_gpu": packed["experts_per_hour"],
        "experts_per_hour_1_per_gpu": single["experts_per_hour"],
        "packing_speedup": round(packed["experts_per_hour"] / single["experts_per_hour"], 3),
    }
    expected = "cuda" if _cuda() else "cpu"
    if packed["device"] != expected:
        row["status"], row["error"] = "failed", f"a num_gpus=0.25 task picked {packed['device']}, expected {expected}"
    if not _cuda():
        row["gpu"] = NO_CUDA + " (one logical Ray GPU; timings are CPU timings)"
    return row


def _random_walk_experts(directory: Path, meta: dict, epochs: int, count: int = 2) -> None:
    """Complete trajectories that random-walk from a fresh net: cost-faithful stand-ins for experts."""
    import torch

    from distill.nets import create_net, flatten_params, param_layout
    from distill.trajectory import Snapshot, expert_file, write_trajectory

    torch.manual_seed(0)
    net = create_net(meta["net"], num_classes=meta["num_classes"], image_size=meta["image_size"], **meta["net_kwargs"])
    layout, start = param_layout(net), flatten_params(net).detach()
    generator = torch.Generator().manual_seed(0)
    step = 0.01 * float(start.abs().mean())
    for expert_id in range(count):
        theta, snaps = start.clone(), []
        for epoch in range(epochs + 1):
            snaps.append(Snapshot(epoch=epoch, params=theta.clone()))
            theta = theta + step * torch.randn(theta.shape, generator=generator)
        write_trajectory(
            directory / expert_file(expert_id),
            snaps,
            layout,
            {**meta, "expert_id": expert_id, "complete": True, "epochs_planned": epochs},
        )


def check_tm(p: dict, size: str) -> dict[str, Any]:
    """First iterations of a distill-tm paper preset entry through distill.matching.match_trajectories."""
    import torch

    from distill.matching import MatchConfig, match_trajectories
    from distill.trajectory import TrajectorySet

    preset = _presets("distill-tm")[p["preset"]]
    entry = next(d for d in preset["distill"] if d["ipc"] == p["ipc"])
    net_kwargs = dict(preset["experts"]["net_kwargs"])
    classes = 100 if "cifar100" in p["preset"] else 10
    image_size = 32
    shrink = p.get("shrink", {})
    if shrink:
        classes, image_size = shrink["classes"], shrink["image_size"]
        net_kwargs["width"] = shrink["width"]
        entry = {**entry, **{k: shrink[k] for k in ("ipc", "syn_steps", "batch_syn") if k in shrink}}
    cfg = MatchConfig(
        **{
            **entry,
            "max_start_epoch": min(entry["max_start_epoch"], 1),
            "iterations": p["iterations"],
            "checkpoint_every": 10**6,
        }
    )
    dev = _device()
    real = None if "cifar100" in p["preset"] else _cifar10()  # CIFAR-100 is not in ../shared/data
    if real is not None:
        from distill.data import DataConfig
        from distill.transforms import Preprocessor

        part = DataConfig(
            source=str(real), classes=list(range(classes)), train_per_class=cfg.ipc, image_size=image_size
        ).load("train")
        x, y = Preprocessor.fit(part.images)(part.images), part.labels
        source = f"cifar10 ({cfg.ipc} real images per class)"
    else:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(classes * cfg.ipc, 3, image_size, image_size, generator=generator)
        y = torch.arange(classes).repeat_interleave(cfg.ipc)
        source = f"random {classes} classes x {cfg.ipc}, 3x{image_size}x{image_size}"
    meta = {
        "net": preset["experts"]["net"],
        "net_kwargs": net_kwargs,
        "num_classes": classes,
        "channels": 3,
        "image_size": image_size,
        "recipe": {"recipe": "random-walk"},
        "dataset_fingerprint": "",
        "preprocessor_fingerprint": "",
        "seed": 0,
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-experts-") as tmp:
        _random_walk_experts(Path(tmp), meta, cfg.max_start_epoch + cfg.expert_epochs)
        timer = _Timer()
        _reset_gpu_peak()
        timer.start = time.perf_counter()
        result = match_trajectories(cfg, TrajectorySet(tmp), x, y, num_classes=classes, device=dev, progress=timer)
    row = {
        **timer.summary(),
        **_gpu_peak(),
        "device": str(dev),
        "data": source,
        "setting": {
            "ipc": cfg.ipc,
            "syn_steps": cfg.syn_steps,
            "batch_syn": cfg.batch_syn,
            "memory": cfg.memory,
            "classes": classes,
            "net": meta["net"],
            "net_kwargs": net_kwargs,
            "image_size": image_size,
        },
        "losses": [round(v, 6) for v in result.losses],
    }
    if not all(map(lambda v: v == v and abs(v) != float("inf"), result.losses)):
        row["status"], row["error"] = "failed", f"non-finite matching loss: {result.losses}"
    if isinstance(row["peak_gpu_mib"], float) and not shrink:
        row["fits_24gib"] = row["peak_gpu_mib"] * 2**20 < 24 * GIB
    return row


def check_krr_st(p: dict, size: str) -> dict[str, Any]:
    """First outer steps of KRR-ST at the CIFAR-100 paper size through distill.krr.krr_distill."""
    import torch

    from distill.krr import KRRConfig, krr_distill
    from distill.nets import create_net

    paper = _presets("distill-krr")["paper"]["krr"]
    cfg = KRRConfig(**{**paper, **p["krr"], "checkpoint_every": 10**6})
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(p["source"], 3, p["image_size"], p["image_size"], generator=generator)
    torch.manual_seed(0)
    teacher = create_net("resnet18", num_classes=10, image_size=p["image_size"])  # the paper's teacher architecture
    dev = _device()
    timer = _Timer()
    _reset_gpu_peak()
    timer.start = time.perf_counter()
    result = krr_distill(cfg, source, teacher, device=dev, progress=timer)
    losses = [h["loss"] for h in result.history]
    row = {
        **timer.summary(),
        **_gpu_peak(),
        "device": str(dev),
        "setting": {
            "source": list(source.shape),
            "num_images": cfg.num_images,
            "net": cfg.net,
            "net_kwargs": cfg.net_kwargs,
            "num_models": cfg.num_models,
            "real_batch": cfg.real_batch,
            "online_iterations": cfg.online_iterations,
            "teacher": "resnet18 (random init)",
            "pool_warmup_steps": sum(i * cfg.online_iterations // cfg.num_models for i in range(cfg.num_models)),
        },
        "losses": [round(v, 6) for v in losses],
    }
    if not all(v == v and abs(v) != float("inf") for v in losses):
        row["status"], row["error"] = "failed", f"non-finite KRR-ST loss: {losses}"
    return row


def check_precision(p: dict, size: str) -> dict[str, Any]:
    """matching_grad under the core's precisions (fp32, tf32, bf16) and torch's defaults vs fp32:
    time and relative difference, through distill.precision.precision_context as the loops use it."""
    import contextlib

    import torch

    from distill.augment import DSAConfig, sample_params
    from distill.matching import Segment, Student, matching_grad
    from distill.nets import create_net, flatten_params
    from distill.precision import cuda_fp32_precision, precision_context
    from distill.trajectory import net_meta

    dev = _device()
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    kwargs = {"width": p["width"], "depth": 3}
    net = create_net("convnet", num_classes=10, **kwargs)
    meta = net_meta(net, "convnet", kwargs, num_classes=10)
    students = {"fast": Student(meta, dev), "native": Student(meta, dev, fast=False)}
    start = flatten_params(net).detach().to(dev)
    target = start + 0.01 * torch.randn_like(start)
    n = 10 * p["ipc"]
    images = torch.randn(n, 3, 32, 32, device=dev)
    labels = torch.arange(10, device=dev).repeat_interleave(p["ipc"])
    generator = torch.Generator().manual_seed(0)
    plan = [
        (torch.arange(n, device=dev), sample_params(n, DSAConfig(), generator).to(dev)) for _ in range(p["syn_steps"])
    ]
    seg = Segment(start, [(p["syn_steps"], target, 1.0)], plan)
    lr = torch.tensor(0.001, device=dev)

    def run(mode: str) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        # torch_default: no context, i.e. whatever torch does unasked (cuDNN convolutions on TF32);
        # fp32_native_layers: fp32 with the experts' own layers (GroupNorm, avg_pool2d) instead of
        # the fast ones matching uses (issue 15's fused norm, timed on the GPU)
        student = students["native" if mode == "fp32_native_layers" else "fast"]
        precision = "fp32" if mode == "fp32_native_layers" else mode
        context = contextlib.nullcontext() if mode == "torch_default" else precision_context(precision, dev)
        times = []
        with context:
            for i in range(p["repeats"] + 1):  # the first call warms up (cuDNN plans, allocator)
                t0 = time.perf_counter()
                loss, g_images, g_lr = matching_grad("unrolled", student, images, labels, lr, seg)
                if cuda:
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
        return min(times), loss, g_images.float(), g_lr.float()

    modes = ["fp32", "fp32_native_layers", "torch_default", "tf32", "bf16"]
    rows: dict[str, Any] = {}
    _PARTIAL["modes"] = rows
    ref = None
    for mode in modes:
        if not cuda and mode in ("torch_default", "tf32"):
            rows[mode] = NO_CUDA
            continue
        seconds, loss, g_images, g_lr = run(mode)
        if ref is None:
            ref = (loss, g_images, g_lr)
        rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
        rows[mode] = {
            "s_per_iter": round(seconds, 4),
            "loss": loss,
            "rel_diff_grad_images": rel(g_images, ref[1]),
            "rel_diff_grad_lr": rel(g_lr, ref[2]),
            "rel_diff_loss": abs(loss - ref[0]) / max(abs(ref[0]), 1e-30),
            "finite": bool(torch.isfinite(g_images).all()) and loss == loss,
        }
    timed = {m: r["s_per_iter"] for m, r in rows.items() if isinstance(r, dict)}
    row = {
        "device": str(dev),
        "modes": rows,
        # time of each mode over fp32's (fast layers): < 1 is faster
        "vs_fp32_time": {m: round(t / timed["fp32"], 3) for m, t in timed.items() if m != "fp32"},
        "reference": "fp32 (precision_context: TF32 off for matmul and cuDNN conv)",
        "setting": {
            "ipc": p["ipc"],
            "classes": 10,
            "syn_steps": p["syn_steps"],
            "net_kwargs": kwargs,
            "memory": "unrolled",
        },
    }
    bad = [m for m, r in rows.items() if isinstance(r, dict) and not r["finite"]]
    if bad:
        row["status"], row["error"] = "failed", f"non-finite gradient under {bad}"
    if cuda:
        matmul, conv = cuda_fp32_precision()
        row["torch_defaults"] = {"matmul": matmul, "cudnn_conv": conv}
    return row


# name -> check(size parameters, size name) -> JSON-able dict; "status" in it overrides "ok"
# (expert_packing last: the orchestrator starts its Prefect server while the others run)
CHECKS: dict[str, Callable[[dict, str], dict[str, Any]]] = {
    "gpu_tests": check_gpu_tests,
    "tm_cifar10_ipc10": check_tm,
    "tm_cifar100_ipc50": check_tm,
    "krr_st": check_krr_st,
    "precision": check_precision,
    "expert_packing": check_expert_packing,
}


def run_one(name: str, size: str) -> None:
    """Child process: run one check, print its JSON as the last line (errors included)."""
    # SIGTERM from the orchestrator (budget spent) unwinds finally blocks: Ray and Prefect stop cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        row = CHECKS[name](SIZES[size].get(name, {}), size)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a recorded result
        import traceback

        traceback.print_exc()
        row = {**_PARTIAL, "status": "failed", "error": f"{type(e).__name__}: {str(e)[:1500]}"}
    print(json.dumps({"check": name, **row}, default=str), flush=True)


# ---------------------------------------------------------------- orchestration


def _spawn(name: str, size: str, timeout: float, log_dir: Path) -> dict[str, Any]:
    log_path = log_dir / f"{name}.log"
    start = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if size == "smoke":
        # One torch thread per process (Ray workers inherit it): the smoke size's tiny ops ran up to
        # 30x slower with two spinning OpenMP threads on a 2-core box that other work keeps busy.
        env.setdefault("OMP_NUM_THREADS", "1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--one", name, "--size", size],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
    wall = round(time.perf_counter() - start, 2)
    lines = [line for line in (out or "").splitlines() if line.startswith("{")]
    row: dict[str, Any] = {"check": name}
    if lines:
        try:
            row.update(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    if timed_out:
        row.update(status="timeout", error=f"over its {timeout:.0f} s budget; log {log_path}")
    elif len(row) == 1:
        tail = log_path.read_text()[-1500:]
        row.update(status="failed", error=f"exit {proc.returncode} without a result; log tail: {tail}")
    row.setdefault("status", "ok")
    row["wall_s"], row["budget_s"] = wall, round(timeout, 1)
    return row


class _BackgroundPrefect:
    """Starts a temporary Prefect server in a thread while the first checks run (it takes ~30 s on a
    busy 2-core box); `url()` waits for it. Nothing is started when PREFECT_API_URL is already set
    or Prefect is not installed (the packing check then reports why it cannot run)."""

    def __init__(self, wanted: bool) -> None:
        self.server, self.seconds = None, 0.0
        self.thread = None
        if wanted and not os.environ.get("PREFECT_API_URL"):
            # set here, not in the thread: other checks' processes are spawned from os.environ meanwhile
            os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gpu-check-prefect-")
            self.thread = threading.Thread(target=self._start, daemon=True)
            self.thread.start()

    def _start(self) -> None:
        start = time.perf_counter()
        try:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()
            server.start(timeout=120)
            self.server = server
        except Exception as e:  # noqa: BLE001 - the packing check reports the missing server itself
            _log(f"background Prefect server did not start: {type(e).__name__}: {e}")
        self.seconds = round(time.perf_counter() - start, 2)

    def url(self) -> str | None:
        if self.thread is not None:
            self.thread.join()
        return self.server.api_url if self.server is not None else None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {NO_CUDA})"


def summarize(rows: list[dict[str, Any]], size: str, wall: float) -> dict[str, Any]:
    """The last line: every check's status, headline figures and the goal booleans."""
    by = {r["check"]: r for r in rows}
    summary: dict[str, Any] = {
        "benchmark": "gpu_check",
        "preset": size,
        "device": _device_name(),
        "wall_s": round(wall, 1),
        "checks": {r["check"]: r["status"] for r in rows},
    }
    headline = {
        "experts_per_hour_4_per_gpu": ("expert_packing", "experts_per_hour_4_per_gpu"),
        "experts_per_hour_1_per_gpu": ("expert_packing", "experts_per_hour_1_per_gpu"),
        "tm_cifar10_ipc10_s_per_iter": ("tm_cifar10_ipc10", "s_per_iter"),
        "tm_cifar10_ipc10_peak_gpu_mib": ("tm_cifar10_ipc10", "peak_gpu_mib"),
        "tm_cifar100_ipc50_s_per_iter": ("tm_cifar100_ipc50", "s_per_iter"),
        "tm_cifar100_ipc50_peak_gpu_mib": ("tm_cifar100_ipc50", "peak_gpu_mib"),
        "krr_st_s_per_iter": ("krr_st", "s_per_iter"),
        "krr_st_peak_gpu_mib": ("krr_st", "peak_gpu_mib"),
    }
    for key, (check, field) in headline.items():
        if field in by.get(check, {}):
            summary[key] = by[check][field]
    for mode, ratio in by.get("precision", {}).get("vs_fp32_time", {}).items():
        summary[f"matching_{mode}_vs_fp32_time"] = ratio
    summary["goal_all_passed"] = all(r["status"] in ("ok", "skipped") for r in rows)
    if size == "full":
        summary["goal_nothing_skipped"] = all(r["status"] == "ok" for r in rows)
        summary["goal_under_8_min"] = wall <= 8 * 60
        if "fits_24gib" in by.get("tm_cifar100_ipc50", {}):
            summary["goal_cifar100_ipc50_constant_under_24gib"] = by["tm_cifar100_ipc50"]["fits_24gib"]
        if "packing_speedup" in by.get("expert_packing", {}):
            summary["goal_packing_faster_than_1_per_gpu"] = by["expert_packing"]["packing_speedup"] > 1.0
    else:
        summary["goal_under_2_min"] = wall <= 2 * 60
    return summary


def append_record(summary: dict[str, Any], rows: list[dict[str, Any]], loadavg_start: str) -> None:
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", 1)) if summary["preset"] == "smoke" else torch.get_num_threads()
    append_flat_record(
        "gpu_check", summary, preset=summary["preset"], threads=threads, loadavg_start=loadavg_start, results=rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (default when CUDA is unavailable)")
    mode.add_argument("--full", action="store_true", help="paper sizes (default when CUDA is available)")
    parser.add_argument("--out", default=str(ROOT / "test-output" / "gpu_check.jsonl"), help="JSON lines written here")
    parser.add_argument("--only", help=f"comma-separated checks to run; known: {', '.join(CHECKS)}")
    record = parser.add_mutually_exclusive_group()
    record.add_argument(
        "--record", action="store_true", default=None, help="append to benchmarks/records (default: full runs only)"
    )
    record.add_argument("--no-record", dest="record", action="store_false")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one check in this process
    parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one, args.size)
        return 0
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # also for the background Prefect server
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    size = "smoke" if args.smoke else "full" if args.full else ("full" if _cuda() else "smoke")
    keep_record = args.record if args.record is not None else size == "full"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / f"{out.stem}-logs"
    log_dir.mkdir(exist_ok=True)
    loadavg_start = loadavg()
    start = time.perf_counter()
    deadline = start + TOTAL_BUDGET_S[size]
    rows = []
    prefect = _BackgroundPrefect("expert_packing" in names)
    with open(out, "w") as f:
        for name in names:
            if name == "expert_packing" and prefect.url():
                os.environ["PREFECT_API_URL"] = prefect.url()  # the check's process reuses it
            left = deadline - time.perf_counter()
            if left < 10:
                row = {
                    "check": name,
                    "status": "timeout",
                    "error": f"the {TOTAL_BUDGET_S[size]} s total budget was spent before it started",
                }
            else:
                row = _spawn(name, size, min(BUDGET_S[size][name], left), log_dir)
            if name == "expert_packing" and prefect.server is not None:
                row["prefect_server_start_s"] = prefect.seconds  # in the background, while earlier checks ran
            rows.append(row)
            line = json.dumps(row, default=str)
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()
        prefect.stop()
        summary = summarize(rows, size, time.perf_counter() - start)
        f.write(json.dumps(summary) + "\n")
    if keep_record:
        append_record(summary, rows, loadavg_start)
    print(json.dumps(summary), flush=True)
    return 0 if summary["goal_all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

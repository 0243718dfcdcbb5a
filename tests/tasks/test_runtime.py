"""Ray scheduling through Prefect: fractional logical GPUs pack tasks, whole GPUs serialize them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray
from prefect import flow, task
from pydantic import ValidationError

from tasks.runtime import Resources, heavy, ray_task_runner, task_device, tie_to_worker


@ray.remote(num_cpus=0)
class Gate:
    """Counts tasks inside the critical section; lets them wait for each other."""

    def __init__(self) -> None:
        self.inside = 0
        self.max_inside = 0

    def enter(self) -> None:
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)

    def leave(self) -> None:
        self.inside -= 1

    def count(self) -> int:
        return self.inside

    def peak(self) -> int:
        return self.max_inside


@task
def occupy(gate, wait_for_peer: bool) -> dict:
    import time

    ray.get(gate.enter.remote())
    deadline = time.monotonic() + (60 if wait_for_peer else 1.5)
    while time.monotonic() < deadline:
        if wait_for_peer and ray.get(gate.count.remote()) >= 2:
            break
        time.sleep(0.05)
    info = {
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "assigned": ray.get_runtime_context().get_assigned_resources(),
        "device": task_device(),
    }
    ray.get(gate.leave.remote())
    return info


@flow(task_runner=ray_task_runner())
def two_tasks(num_gpus: float, wait_for_peer: bool) -> tuple[list[dict], int]:
    gate = Gate.remote()
    with heavy(Resources(num_gpus=num_gpus, num_cpus=1), "eval"):
        futures = [occupy.submit(gate, wait_for_peer) for _ in range(2)]
    results = [f.result() for f in futures]
    return results, ray.get(gate.peak.remote())


@pytest.mark.integration
def test_half_gpu_tasks_share_one_logical_gpu(prefect_server, ray_logical_gpu):
    results, peak = two_tasks(0.5, wait_for_peer=True)
    assert peak == 2, "two num_gpus=0.5 tasks should run at the same time on one GPU"
    for info in results:
        assert info["gpu_ids"] == ["0"]
        assert info["assigned"]["GPU"] == pytest.approx(0.5)
        # A logical GPU on a machine without CUDA: the task must still pick a working device.
        assert info["device"] == "cpu"


@pytest.mark.integration
def test_whole_gpu_tasks_run_one_at_a_time(prefect_server, ray_logical_gpu):
    results, peak = two_tasks(1.0, wait_for_peer=False)
    assert peak == 1
    assert all(r["assigned"]["GPU"] == pytest.approx(1.0) for r in results)


@task
def granted() -> dict:
    return dict(ray.get_runtime_context().get_assigned_resources())


@flow(task_runner=ray_task_runner())
def per_stage(resources: Resources) -> dict[str, dict]:
    out = {}
    for stage in ("experts", "distill-tm"):
        with heavy(resources, stage):
            out[stage] = granted.submit()
    return {stage: f.result() for stage, f in out.items()}


@pytest.mark.integration
def test_a_stage_override_changes_only_that_stages_request(prefect_server, ray_logical_gpu):
    """Experts pack four to a GPU while distillation takes a whole one, from one resources block."""
    res = Resources(num_gpus=0.25, num_cpus=1, stages={"distill-tm": {"num_gpus": 1}})
    got = per_stage(res)
    assert got["experts"]["GPU"] == pytest.approx(0.25) and got["distill-tm"]["GPU"] == pytest.approx(1.0)
    assert got["experts"]["CPU"] == got["distill-tm"]["CPU"] == 1


def test_stage_overrides_merge_are_named_and_checked_up_front(ray_logical_gpu):
    res = Resources(num_gpus=0.25, num_cpus=1, stages={"distill-tm": {"num_gpus": 1}, "eval": {"num_cpus": 2}})
    assert res.at("distill-tm") == Resources(num_gpus=1, num_cpus=1)
    assert res.at("eval") == Resources(num_gpus=0.25, num_cpus=2)
    assert res.at("experts") == Resources(num_gpus=0.25, num_cpus=1)
    # serial stages: serial_cpus first, then the stage's own override wins
    serial = Resources(num_cpus=1, serial_cpus=2, stages={"krr-st": {"num_cpus": 1}}).serial()
    assert serial.at("ssl-teacher").num_cpus == 2 and serial.at("krr-st").num_cpus == 1
    with pytest.raises(ValueError, match="unknown stage 'distill'; valid: experts, distill-tm, eval"):
        res.at("distill")
    with pytest.raises(ValidationError, match=r"unknown stage\(s\) 'distil-tm'; valid: experts, distill-tm"):
        Resources(stages={"distil-tm": {"num_gpus": 1}})
    with pytest.raises(ValidationError, match="extra"):
        Resources(stages={"eval": {"gpus": 1}})
    # a config without overrides dumps as before they existed; one with them round-trips
    assert "stages" not in Resources().model_dump(mode="json")
    assert Resources.model_validate(res.model_dump(mode="json")) == res
    # every stage's request is checked when the flow starts, naming the stage
    with pytest.raises(ValueError, match=r"resources.stages\['distill-tm'\]: .*num_gpus=2.0 but the Ray cluster"):
        Resources(num_gpus=0, stages={"distill-tm": {"num_gpus": 2}}).check_feasible()


def test_auto_gpus_resolve_against_cluster(ray_logical_gpu):
    assert Resources(num_gpus="auto").resolved_gpus() == 1.0
    assert Resources(num_gpus=0.25).resolved_gpus() == 0.25
    with pytest.raises(ValueError, match="num_gpus"):
        Resources(num_gpus=-1).resolved_gpus()
    with pytest.raises(ValueError, match="request num_gpus=2.0 but the Ray cluster has 1.0 GPUs"):
        Resources(num_gpus=2).resolved_gpus()


def test_more_cpus_than_any_node_is_refused_up_front(ray_logical_gpu):
    """Old behaviour: Ray queued an infeasible num_cpus request forever and the flow hung."""
    cpus = max(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])
    assert Resources(num_gpus=0, num_cpus=cpus).check_feasible() == {"num_gpus": 0.0, "num_cpus": cpus}
    with pytest.raises(ValueError, match=rf"num_cpus={cpus + 2:g} but the largest Ray node has {cpus:g} CPUs"):
        Resources(num_gpus=0, num_cpus=cpus + 2).check_feasible()
    with pytest.raises(ValueError, match="num_gpus=2.0 but the Ray cluster has 1.0 GPUs"):
        Resources(num_gpus=2, num_cpus=1).check_feasible()


def test_a_flow_run_process_stops_when_its_worker_dies(tmp_path):
    """Old behaviour: a flow whose worker was killed ran on, published everything, and was then
    marked Crashed. Now it stops with its worker (SIGTERM, which Prefect records as a crash)."""
    import signal
    import subprocess
    import sys

    child = (
        "import os, sys, time\n"
        "from tasks.runtime import tie_to_worker\n"
        "assert tie_to_worker(poll_s=0.1)\n"
        f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
        f"open({str(tmp_path / 'survived')!r}, 'w').write('1')\n"
    )
    worker = (  # stands in for the Prefect worker: starts the run, then is killed
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}], env={{**os.environ, 'PREFECT__FLOW_RUN_ID': 'x'}})\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", worker], cwd=Path(__file__).resolve().parents[2])
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    import psutil

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break  # exited; only waiting for its new parent to reap it
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the flow-run process outlived its worker")
    assert not (tmp_path / "survived").exists()


def test_tie_to_worker_is_off_outside_a_worker(monkeypatch):
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert tie_to_worker() is False


def test_local_ray_keeps_token_auth_without_warning_on_every_run():
    import subprocess
    import sys

    code = (
        "import os, ray\nfrom tasks.runtime import ray_init_kwargs\nk = ray_init_kwargs(); k['num_cpus'] = 1\n"
        "ray.init(**k)\nprint('started')\nray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "started" in proc.stdout
    assert "Token authentication is enabled" not in proc.stderr


def test_serial_stages_may_take_more_cores_and_are_checked_up_front(ray_logical_gpu):
    res = Resources(num_gpus=0, num_cpus=1, serial_cpus=2)
    assert res.serial() == Resources(num_gpus=0, num_cpus=2) and Resources(num_cpus=1).serial().num_cpus == 1
    assert res.check_feasible()["num_cpus"] == 1  # the other stages keep their request
    with pytest.raises(ValueError, match="serial_cpus=3 but the largest Ray node has 2 CPUs"):
        Resources(num_gpus=0, serial_cpus=3).check_feasible()


def test_heavy_stage_names_are_the_artifact_stages_their_tasks_publish():
    """HEAVY_STAGES is written out in tasks.runtime (below the stage modules); it must not drift from them."""
    from tasks import evaluation, experts, krr, matching, prune, transfer
    from tasks.runtime import HEAVY_STAGES

    published = {
        experts.STAGE,
        matching.STAGE,
        evaluation.EVAL_STAGE,
        evaluation.REAL_EVAL_STAGE,
        prune.SURROGATE_STAGE,
        prune.SELECTION_STAGE,
        transfer.TRANSFER_STAGE,
        krr.TEACHER_STAGE,
        krr.DISTILL_STAGE,
        krr.EVAL_STAGE,
    }
    assert set(HEAVY_STAGES) == published

"""scripts/gpu_check.sh --smoke end to end on the CPU, so the GPU check is ready whenever a GPU is lent.

Every check runs at its tiny size (Prefect + Ray with one logical GPU for the packing) and
must report a result line; the summary must say all passed within the smoke budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_check import CHECKS, NO_CUDA  # noqa: E402


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_gpu_check_smoke_runs_every_check_and_summarizes(prefect_server, tmp_path):
    import torch

    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)  # other work on the box: the 2 minutes cannot hold
    out = tmp_path / "gpu_check.jsonl"
    env = {**os.environ, "PREFECT_API_URL": prefect_server}  # reuse the session's server
    start = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--no-record", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    wall = time.monotonic() - start
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    detail = json.dumps(rows, indent=1)[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, detail
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == summary  # stdout's last line is the summary

    assert [r["check"] for r in rows] == list(CHECKS)
    assert all(r["status"] in ("ok", "skipped") for r in rows), detail
    assert summary["benchmark"] == "gpu_check" and summary["preset"] == "smoke"
    assert summary["checks"] == {r["check"]: r["status"] for r in rows}
    assert summary["goal_all_passed"] is True
    assert summary["goal_under_2_min"] is True or busy, f"the smoke run took {wall:.0f} s on an idle box"

    by = {r["check"]: r for r in rows}
    assert by["gpu_tests"]["failed"] == 0 and by["gpu_tests"]["tests"] >= 5
    packing = by["expert_packing"]
    assert packing["experts_per_hour_4_per_gpu"] > 0 and packing["experts_per_hour_1_per_gpu"] > 0
    rounds = {r["label"]: r for r in packing["rounds"]}
    assert rounds["4 per GPU"]["num_gpus"] == 0.25 and rounds["1 per GPU"]["num_gpus"] == 1.0
    assert rounds["4 per GPU"]["ray_gpu_ids"] == ["0"]  # Ray assigned the (logical) GPU
    for name in ("tm_cifar10_ipc10", "tm_cifar100_ipc50", "krr_st"):
        assert by[name]["s_per_iter"] > 0 and by[name]["timed_iterations"] >= 1
    assert by["tm_cifar100_ipc50"]["setting"]["memory"] == "constant"
    assert by["tm_cifar10_ipc10"]["setting"]["memory"] == "unrolled"
    modes = by["precision"]["modes"]
    assert modes["fp32"]["rel_diff_grad_images"] == 0.0 and modes["bf16"]["finite"]
    # the native layers give the fast ones' gradient to float rounding, and are timed beside them
    assert modes["fp32_native_layers"]["rel_diff_grad_images"] < 1e-4
    assert summary["matching_fp32_native_layers_vs_fp32_time"] > 0
    if not torch.cuda.is_available():
        assert by["gpu_tests"]["status"] == "skipped"
        assert by["tm_cifar10_ipc10"]["peak_gpu_mib"] == NO_CUDA and modes["tf32"] == NO_CUDA
        assert rounds["4 per GPU"]["device"] == "cpu"  # a logical GPU: the task still picks a working device

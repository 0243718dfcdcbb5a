"""benchmarks/pipeline.py times any flow cold and warm: a smoke run on the baseline's tiny preset, so the
script that measures the flows' budgets cannot rot (its own Prefect server, a fresh store, no record)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, data_path


@pytest.mark.integration
def test_flow_time_benchmark_times_a_flow_cold_and_warm():
    data_path("cifar10", "train.parquet")
    command = [sys.executable, "benchmarks/pipeline.py", "--flow", "baseline", "--preset", "tiny", "--no-record"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "flow_time" and out["flow"] == "baseline" and "results" not in out
    assert out["cold_s"] > out["warm_s"] > 0  # the warm run reuses every stage
    assert out["goal_cold_under_15_min"] and out["peak_rss_mib_cold"] > 0

"""benchmarks/tm_quality.py at its tiny size: the harness behind issue 14's numbers keeps working.

One run with the soft-label switch, DD-Ranking scores and a second architecture; the last line
must be the summary JSON with the scores computed from the printed accuracies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.ranking import scores
from tests.conftest import data_path

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_tiny_run_reports_ranking_and_other_architectures(tmp_path):
    cifar = data_path("cifar10")
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "tm_quality.py"),
        "--preset",
        "tiny",
        "--work",
        str(tmp_path),
        "--data",
        str(cifar),
        "--no-record",
        "--ranking",
        "--archs",
        "convnet-w64",
        "--set",
        "soft_labels=true",
        "--set",
        "lr_labels=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    entry = summary["results"]["1"]
    last = entry["points"][-1]
    assert last["its"] == 20 and "own_labels" in last  # the soft labels are judged beside the hard ones
    r = entry["ranking"]
    expected = scores(
        r["full_real"] / 100,
        last["mean"] / 100,
        last["own_labels"]["mean"] / 100,
        entry["random_real_soft"]["mean"] / 100,
    )
    assert r["own_labels"] == "soft" and r["hlr"] == pytest.approx(expected["hlr"], abs=1e-4)
    assert r["lrs"] == pytest.approx(expected["lrs"], abs=1e-4)
    across = entry["architectures"]["convnet-w64"]
    assert across["its"] == 20 and 0 <= across["set"]["mean"] <= 100 and 0 <= across["random_real"]["mean"] <= 100
    bad = subprocess.run(
        [*cmd[:2], "--preset", "tiny", "--archs", "vgg"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "unknown --archs ['vgg']; valid: convnet, convnet-w64, resnet18" in bad.stderr

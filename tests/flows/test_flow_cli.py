"""Every flow's module entry point takes a preset, your data and --set overrides, validated like the form."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.baseline import BaselineConfig
from flows.presets import build_config, flow_params

REPO = Path(__file__).resolve().parents[2]


def test_data_and_set_override_the_preset():
    _, params = flow_params(
        "baseline",
        [
            "--preset",
            "tiny",
            "--data",
            "/my/images",
            "--set",
            "ipc=5",
            "--set",
            "eval.train.epochs=7",
            "--set",
            "data.classes=[1, 2]",
        ],
    )
    cfg = build_config(BaselineConfig, params)
    assert cfg.data.source == "/my/images" and cfg.ipc == 5 and cfg.eval.train.epochs == 7
    assert cfg.data.classes == [1, 2]


def test_source_target_and_list_items():
    _, params = flow_params("distill-tm", ["--set", "distill.0.ipc=3"])
    assert params["distill"][0]["ipc"] == 3
    _, params = flow_params("pipeline", ["--source", "/src", "--target", "/tgt"])
    assert params["source"]["source"] == "/src" and params["target"]["source"] == "/tgt"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "/x"], "flow 'baseline' has no `source` block"),
        (["--set", "ipc"], "--set expects KEY=VALUE"),
        (["--set", "ipc.deep=1"], "ipc is a value, not a block"),
        (["--preset", "huge"], "valid presets: tiny, cpu, paper"),
    ],
)
def test_bad_command_lines_are_refused(argv, message, capsys):
    with pytest.raises((SystemExit, ValueError)) as info:
        flow_params("baseline", argv)
    text = str(info.value) if isinstance(info.value, ValueError) else capsys.readouterr().err
    assert message in text


def test_an_invalid_override_is_one_line_per_problem_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "flows.baseline", "--set", "ipc=0", "--set", "eval.num_models=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith("error: ipc: ") for line in lines)
    assert any(line.startswith("error: eval.num_models: ") for line in lines)
    assert "Traceback" not in proc.stderr

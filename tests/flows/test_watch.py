"""`python -m flows.watch`: stage lines with state, cache reuse and metrics, read from a real flow run."""

from __future__ import annotations

import io

import pytest

from flows.baseline import BaselineConfig, baseline
from flows.presets import load_preset
from flows.watch import StageLine, Watcher, follow
from tests.conftest import data_path


def test_stage_line_eta_and_text():
    line = StageLine(
        "train-expert",
        state="RUNNING",
        started=0.0,
        progress=50.0,
        detail="expert 0: loss=1.25, acc=0.41",
        history=[(0.0, 0.0), (10.0, 50.0)],
    )
    assert line.eta_s(10.0) == pytest.approx(10.0)
    assert line.text(10.0) == "train-expert:  50.0%, ETA 10 s (loss=1.25, acc=0.41)"
    done = StageLine("dataset", state="COMPLETED", started=0.0, finished=125.0)
    assert done.text(200.0) == "dataset: completed in 2.1 min"
    assert StageLine("eval", state="COMPLETED", cached=True).text(0.0) == "eval: reused (cached)"


@pytest.mark.integration
def test_follow_reports_every_stage_and_the_reuse_of_a_warm_run(prefect_server, tmp_path):
    cifar = data_path("cifar10")
    params = load_preset("baseline", "tiny")
    params["data"]["source"] = str(cifar)
    cfg = BaselineConfig(**{**params, "store": str(tmp_path / "store")})
    cold = baseline(cfg, return_state=True)
    out = io.StringIO()
    assert follow(cold.state_details.flow_run_id, interval=0.1, out=out, tty=False) == 0
    text = out.getvalue()
    assert "✓ materialize-dataset: completed in" in text and "flow run completed" in text and "reused" not in text

    warm = baseline(cfg, return_state=True)
    out = io.StringIO()
    assert follow(warm.state_details.flow_run_id, interval=0.1, out=out, tty=False) == 0
    assert "✓ materialize-dataset: reused (cached)" in out.getvalue()
    assert "of them reused from the cache" in out.getvalue().splitlines()[-1]


def test_watcher_renders_a_running_stage_once_per_decile():
    out = io.StringIO()
    w = Watcher(client=None, flow_run_id=None, out=out, tty=False)  # type: ignore[arg-type]
    w.stages = {1: StageLine("distill-tm", state="RUNNING", started=0.0, progress=12.0)}
    w.render()
    w.render()
    w.stages[1].progress = 25.0
    w.render()
    assert out.getvalue().count("distill-tm") == 2

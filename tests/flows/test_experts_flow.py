"""The `experts` flow in-process against the session's Prefect server and local Ray (tiny preset)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distill.formats import read_metrics
from distill.trajectory import TrajectorySet
from flows.experts import ExpertsConfig, experts
from flows.presets import load_preset, presets
from tests.conftest import data_path


@pytest.mark.parametrize("preset", sorted(presets("experts")))
def test_every_preset_is_a_valid_config(preset):
    cfg = ExpertsConfig(**load_preset("experts", preset))
    assert [e.recipe for e in cfg.experts] == ["mtt", "ast"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts": []}, "at least 1 item"),
        ({"experts": [{"recipe": "mtt", "num_experts": 0}]}, "greater than or equal to 1"),
        ({"experts": [{"recipe": "mtt", "epochs": 0}]}, "greater than or equal to 1"),
        ({"experts": [{"recipe": "fancy"}]}, "fancy.*mtt, ast, sam"),
        ({"experts": [{"recipe": "mtt", "net": "vgg"}]}, "(registered nets|valid): convnet"),
        ({"experts": [{"recipe": "mtt"}, {"recipe": "mtt"}]}, "its own recipe"),
    ],
)
def test_bad_parameters_are_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        ExpertsConfig(**{**load_preset("experts", "tiny"), **change})


@pytest.mark.integration
def test_experts_tiny_trains_publishes_and_reuses(prefect_server, tmp_path):
    data_path("cifar10", "train.parquet")
    cfg = ExpertsConfig(**{**load_preset("experts", "tiny"), "store": str(tmp_path)})
    rows = experts(cfg)
    assert sorted((r["recipe"], r["expert_id"]) for r in rows) == [("ast", 0), ("ast", 1), ("mtt", 0), ("mtt", 1)]
    sets = sorted(p for p in (tmp_path / "experts").iterdir() if (p / "manifest.json").exists())
    assert len(sets) == 2
    for d in sets:
        trajectories = TrajectorySet(d)
        assert len(trajectories) == 2 and trajectories.last_epoch == 3
        assert (d / "smoothness.png").read_bytes()[:4] == b"\x89PNG"
        metrics = read_metrics(str(d / "experts.parquet"))
        assert {m["expert_id"] for m in metrics} == {0, 1} and all(0 <= m["test_acc"] <= 1 for m in metrics)
    assert not list((tmp_path / ".work" / "experts").glob("*/expert-*")), "work files are removed once published"

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "experts").rglob("*")}
    assert experts(cfg) == rows, "a re-run reuses the published sets"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "experts").rglob("*")} == before

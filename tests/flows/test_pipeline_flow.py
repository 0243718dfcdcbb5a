"""The `pipeline` flow: parameters, conflicts refused before any stage, and a real tiny run with its report."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from distill.formats import read_metrics
from flows.pipeline import PipelineConfig, pipeline
from flows.presets import load_preset, presets
from tests.conftest import data_path


def _tiny(**changes) -> dict:
    params = copy.deepcopy(load_preset("pipeline", "tiny"))
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return params


@pytest.mark.parametrize("preset", sorted(presets("pipeline")))
def test_every_preset_is_a_valid_config(preset):
    cfg = PipelineConfig(**load_preset("pipeline", preset))
    assert cfg.krr is not None and cfg.tm is not None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"krr": None, "tm": None}, "both paths are switched off"),
        ({"prune.ratio": 1.0}, "strictly between 0 and 1"),
        ({"prune.method": "magic"}, "magic"),
        ({"source.zca": True}, "set zca: false on source and target"),
        ({"krr.methods": ["no-pretrain"]}, "must include 'krr-st'"),
        ({"krr.methods": ["krr-st", "bogus"]}, "unknown method 'bogus'; valid: krr-st"),
        ({"tm.distill": [{"ipc": 1, "expert_epochs": 2, "max_start_epoch": 2}]}, "exceeds the experts' 3 epochs"),
    ],
)
def test_conflicting_parameters_are_refused_before_the_run(changes, message):
    with pytest.raises(ValidationError, match=message):
        PipelineConfig(**_tiny(**changes))


def test_different_image_sizes_are_resized_and_said_so():
    cfg = PipelineConfig(**_tiny(**{"target.image_size": 32}))
    target, note = cfg.transfer_target()
    assert target.image_size == 16 and "resized from 32 px to the source's 16 px" in note


@pytest.mark.integration
def test_too_many_synthetic_images_for_the_pruned_source_fail_before_any_stage(prefect_server, tmp_path):
    data_path("tiny-imagenet-200", "train.parquet")
    # 10 classes x 20 images pruned by half leave 100 images: 150 synthetic images cannot come from them
    params = _tiny(**{"krr.krr.num_images": 150})
    with pytest.raises(ValueError, match="num_images=150 synthetic images.*only 100 images"):
        pipeline(PipelineConfig(**{**params, "store": str(tmp_path)}))
    assert not any(tmp_path.iterdir()), "nothing may be materialized for a refused run"


@pytest.mark.integration
def test_tiny_pipeline_runs_both_paths_and_reports_every_one(prefect_server, tmp_path):
    data_path("tiny-imagenet-200", "train.parquet")
    data_path("cifar10", "train.parquet")
    params = _tiny(**{"target.image_size": 32})  # a size mismatch: resized for the transfer path, and said so
    result = pipeline(PipelineConfig(**{**params, "store": str(tmp_path)}))
    rows = result["rows"]
    methods = {(r["path"].split(" ")[0], r["method"]) for r in rows}
    assert {("prune", "krr-st"), ("prune", "no-pretrain"), ("prune", "random-real-targets")} <= methods
    assert any(m == "random-real" for _, m in methods) and any(m.startswith("tm-") for _, m in methods)
    for r in rows:
        accs = [r[k] for k in ("linear_probe_acc_mean", "fine_tune_acc_mean", "test_acc_mean") if r[k] is not None]
        assert accs and all(0.0 <= a <= 1.0 for a in accs), r
        assert r["wall_s"] >= 0.0
    # DP4TL's comparison: the pruned source against the full source and no pretraining, one table
    dp4tl = {r["method"]: r for r in rows if r["path"] == "prune -> pretrain -> transfer (DP4TL)"}
    assert set(dp4tl) == {"lm (pruned 50% of classes)", "full source", "no pretraining"}
    assert dp4tl["lm (pruned 50% of classes)"]["kind"] == "method"
    assert 0 < dp4tl["lm (pruned 50% of classes)"]["data_mib"] < dp4tl["full source"]["data_mib"]
    assert dp4tl["no pretraining"]["data_mib"] == 0
    krr = next(r for r in rows if r["method"] == "krr-st")
    assert krr["data_mib"] > 0 and krr["wall_s"] > 0 and krr["peak_rss_mb"] > 0
    full = next(r for r in rows if r["method"] == "full-real")  # DD-Ranking's reference: the whole train split
    assert full["data_mib"] > next(r for r in rows if r["method"] == "random-real")["data_mib"] > 0
    notes = " ".join(result["notes"])
    assert "DD-Ranking tm-mtt ipc1/convnet (hard labels): HLR" in notes
    assert "resized from 32 px" in notes and "kept 5 of 10 source classes" in notes
    assert "full source minus no pretraining, points): linear probe " in notes
    stored = read_metrics(result["report_uri"] + "/report.parquet")
    assert len(stored) == len(rows)

    # A changed downstream parameter (one more evaluation seed) reuses every stage that made data.
    before = {p.name: sorted(x.name for x in p.iterdir() if not x.name.startswith(".")) for p in tmp_path.iterdir()}
    params["krr"]["seeds"] = 2
    pipeline(PipelineConfig(**{**params, "store": str(tmp_path)}))
    after = {p.name: sorted(x.name for x in p.iterdir() if not x.name.startswith(".")) for p in tmp_path.iterdir()}
    stages = (
        "dataset",
        "surrogate",
        "selection",
        "pruned",
        "pretrain",
        "ssl-teacher",
        "krr-st",
        "experts",
        "distill-tm",
    )
    for stage in stages:
        assert after.get(stage) == before.get(stage), f"stage {stage} was recomputed"

"""The `distill-krr` flow in-process against the session's Prefect server and local Ray (tiny preset)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distill.formats import read_distilled, read_metrics
from distill.krr import METHODS
from distill.ssl import load_teacher
from flows.distill_krr import DistillKRRConfig, distill_krr_flow
from flows.presets import load_preset, presets
from tests.conftest import data_path


@pytest.mark.parametrize("preset", sorted(presets("distill-krr")))
def test_every_preset_is_a_valid_config(preset):
    cfg = DistillKRRConfig(**load_preset("distill-krr", preset))
    assert cfg.methods == list(METHODS) and cfg.source.image_size == cfg.target.image_size


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["krr-st", "kip"]}, "valid: krr-st"),
        ({"methods": ["krr-st", "krr-st"]}, "must not repeat"),
        ({"krr": {"pool_mode": "trained"}}, "valid: online, random-features"),
        ({"teacher": {"net": "vgg"}}, "(registered nets|valid): convnet"),
        ({"seeds": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_parameters_are_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        DistillKRRConfig(**{**load_preset("distill-krr", "tiny"), **change})


@pytest.mark.integration
def test_distill_krr_tiny_produces_teacher_distilled_set_and_table(prefect_server, tmp_path):
    data_path("tiny-imagenet-200", "train.parquet")
    data_path("cifar10", "train.parquet")
    cfg = DistillKRRConfig(**{**load_preset("distill-krr", "tiny"), "store": str(tmp_path)})
    result = distill_krr_flow(cfg)
    assert [r["method"] for r in result["summary"]] == list(METHODS)
    for row in result["summary"]:
        assert 0 <= row["linear_probe_acc_mean"] <= 1 and 0 <= row["fine_tune_acc_mean"] <= 1 and row["seeds"] == 1

    (teacher_dir,) = [p for p in (tmp_path / "ssl-teacher").iterdir() if (p / "manifest.json").exists()]
    teacher = load_teacher(teacher_dir / "teacher.safetensors")
    (distilled_dir,) = [p for p in (tmp_path / "krr-st").iterdir() if (p / "manifest.json").exists()]
    syn = read_distilled(str(distilled_dir))
    assert syn.pixels.shape == (6, 3, 16, 16) and syn.targets.shape == (6, teacher.feature_dim)
    assert syn.method == "krr-st" and syn.recipe["train"]["loss"] == "mse"
    assert syn.provenance["teacher_fingerprint"] and len(syn.provenance["source_indices"]) == 6
    assert "target" in (distilled_dir / "README.md").read_text()
    assert len(read_metrics(str(distilled_dir / "loss.parquet"))) == 4
    assert not list((tmp_path / ".work").rglob("state.json")), "work checkpoints are removed once published"
    rows = read_metrics(result["metrics_uri"] + "/metrics.parquet")
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted((m, 0) for m in METHODS)


@pytest.mark.integration
def test_more_synthetic_images_than_source_images_fails_before_training(prefect_server, tmp_path):
    data_path("tiny-imagenet-200", "train.parquet")
    params = load_preset("distill-krr", "tiny")
    cfg = DistillKRRConfig(**{**params, "krr": {**params["krr"], "num_images": 61}, "store": str(tmp_path)})
    with pytest.raises(ValueError, match="num_images=61 .* only 60 train images"):
        distill_krr_flow(cfg)
    assert not (tmp_path / "dataset").exists(), "nothing may be materialized for a refused run"

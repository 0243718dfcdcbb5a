"""The `baseline` flow's parameters, presets and bad-input behaviour (in-process, real server and Ray)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distill.data import DataError
from flows import deployments
from flows.baseline import BaselineConfig, baseline
from flows.presets import load_preset, presets
from tests.conftest import data_path


@pytest.mark.parametrize("preset", sorted(presets("baseline")))
def test_every_preset_is_a_valid_config(preset):
    cfg = BaselineConfig(**load_preset("baseline", preset))
    assert cfg.ipc >= 1 and cfg.eval.num_models >= 1


def test_prefect_yaml_is_generated_from_the_presets():
    assert deployments.PREFECT_FILE.read_text() == deployments.text(), "run: python -m flows.deployments"


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: tiny, cpu, paper"):
        load_preset("baseline", "huge")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ipc": 0}, "greater than or equal to 1"),
        ({"eval": {"net": "vgg"}}, "(registered nets|valid): convnet"),
        ({"data": {"source": "x", "format": "zip"}}, "valid( formats)?: auto, parquet"),
        ({"eval": {"train": {"augment": "mixup"}}}, "mixup"),
        ({"resources": {"num_cpus": 0}}, "greater than 0"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_parameters_are_refused_before_the_run(change, message):
    params = {**load_preset("baseline", "tiny"), **change}
    with pytest.raises(ValidationError, match=message):
        BaselineConfig(**params)


@pytest.mark.integration
def test_k_larger_than_a_class_fails_before_any_stage(prefect_server, tmp_path):
    data_path("cifar10", "train.parquet")
    params = load_preset("baseline", "tiny")
    cfg = BaselineConfig(**{**params, "ipc": 25, "store": str(tmp_path)})  # tiny keeps 20 per class
    with pytest.raises(DataError, match="ipc=25 images per class is larger than a class of .*has 20"):
        baseline(cfg)
    assert not (tmp_path / "dataset").exists(), "nothing may be materialized for a refused run"


@pytest.mark.integration
def test_grey_native_size_data_keeps_one_channel_end_to_end(prefect_server, tmp_path):
    """MNIST-like data (grey 28 x 28) with channels 1 at native size: stored, subset and trained on as
    [1, 28, 28], the nets adapting their first layer, not as replicated RGB resized to 32 px."""
    import json
    from pathlib import Path

    import numpy as np

    from distill.downstream import load_distilled

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    x = (rng.integers(0, 60, (30, 28, 28)) + 60 * y[:, None, None]).astype(np.uint8)  # class = brightness
    np.savez(tmp_path / "grey.npz", x_train=x, y_train=y, x_test=x[::2], y_test=y[::2])
    params = load_preset("baseline", "tiny")
    data = {"source": str(tmp_path / "grey.npz"), "image_size": None, "channels": 1}
    result = baseline(BaselineConfig(**{**params, "data": data, "store": str(tmp_path / "store")}))
    manifest = json.loads((Path(result["dataset_uri"]) / "manifest.json").read_text())
    assert manifest["image_shape"] == [1, 28, 28]
    subset = load_distilled(result["subset_uri"])
    assert tuple(subset.pixels.shape) == (3 * params["ipc"], 1, 28, 28)
    assert 0.0 <= result["summary"][0]["test_acc_mean"] <= 1.0

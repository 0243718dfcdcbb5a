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

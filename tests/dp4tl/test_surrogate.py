"""Tests of the DP4TL surrogate: it learns a learnable set, round-trips through safetensors, refuses a wrong head."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from distill.formats import FormatError
from distill.train import TrainConfig, evaluate
from dp4tl.surrogate import SurrogateConfig, load_surrogate, save_surrogate, surrogate_fingerprint, train_surrogate

NUM_CLASSES = 4


def _learnable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3x8x8 images: a fixed per-class pattern plus noise, so a tiny ConvNet separates them in a few epochs."""
    patterns = torch.randn(NUM_CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    return patterns[y] + 0.8 * torch.randn(len(y), 3, 8, 8, generator=g), y


def _cfg(**overrides) -> SurrogateConfig:
    train = TrainConfig(epochs=6, batch_size=32, lr=0.05, augment="none", schedule="constant")
    return SurrogateConfig(net="convnet", net_kwargs={"width": 8, "depth": 2}, train=train, **overrides)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    x, y = _learnable(40, seed=0)
    return train_surrogate(_cfg(), x, y, NUM_CLASSES, device="cpu")


def test_surrogate_learns_above_chance(trained):
    x, y = _learnable(25, seed=1)
    assert not trained.training
    assert evaluate(trained, x, y, device="cpu")["acc"] > 0.6  # chance is 0.25


def test_training_is_seeded():
    x, y = _learnable(10, seed=0)
    cfg = _cfg().model_copy(update={"train": _cfg().train.model_copy(update={"epochs": 1})})
    a = surrogate_fingerprint(train_surrogate(cfg, x, y, NUM_CLASSES, device="cpu"))
    b = surrogate_fingerprint(train_surrogate(cfg, x, y, NUM_CLASSES, device="cpu"))
    c = surrogate_fingerprint(train_surrogate(cfg.model_copy(update={"seed": 1}), x, y, NUM_CLASSES, device="cpu"))
    assert a == b != c


def test_save_load_round_trip(trained, tmp_path):
    path = str(tmp_path / "sub" / "surrogate.safetensors")
    fingerprint = save_surrogate(trained, path, {"source": "synthetic"})
    loaded = load_surrogate(path, _cfg(), NUM_CLASSES, channels=3, image_size=8)
    x, _ = _learnable(3, seed=2)
    assert fingerprint == surrogate_fingerprint(trained) == surrogate_fingerprint(loaded)
    assert torch.equal(loaded(x), trained.cpu()(x))


def test_head_mismatch_names_both_numbers(trained, tmp_path):
    path = str(tmp_path / "surrogate.safetensors")
    save_surrogate(trained, path)
    with pytest.raises(ValueError, match=r"head has 4 classes, but the source has 10"):
        load_surrogate(path, _cfg(), 10, channels=3, image_size=8)


def test_unreadable_or_foreign_weights(trained, tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_surrogate(str(tmp_path / "missing.safetensors"), _cfg(), NUM_CLASSES, 3, 8)
    path = tmp_path / "surrogate.safetensors"
    save_surrogate(trained, str(path))
    wider = _cfg().model_copy(update={"net_kwargs": {"width": 16, "depth": 2}})
    with pytest.raises(FormatError, match="do not fit net 'convnet'"):
        load_surrogate(str(path), wider, NUM_CLASSES, 3, 8)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(FormatError, match="surrogate.safetensors"):
        load_surrogate(str(path), _cfg(), NUM_CLASSES, 3, 8)


def test_config_refuses_unknown_net_and_arguments():
    with pytest.raises(ValidationError, match="unknown net 'vgg99'; valid: convnet"):
        SurrogateConfig(net="vgg99")
    with pytest.raises(ValidationError, match="unknown argument.*widht"):
        SurrogateConfig(net_kwargs={"widht": 32})
    with pytest.raises(ValidationError):
        SurrogateConfig(epochs=3)  # extra=forbid: training settings live in `train`


def test_labels_out_of_range_are_refused():
    x, y = _learnable(2, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        train_surrogate(_cfg(), x, y, 3, device="cpu")

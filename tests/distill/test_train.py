"""Tests for distill.train (loops, config, augmentation registry) and distill.utils."""

import math

import pytest
import torch
from pydantic import ValidationError

from distill.augment import flip_crop, register_augment
from distill.nets import create_net, flatten_params
from distill.train import (
    AUGMENTS,
    SCHEDULES,
    TrainConfig,
    evaluate,
    extract_features,
    train,
)
from distill.utils import resolve_device, seed_everything

NUM_CLASSES = 10


def _patterns(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 16x16 images: a class colour plus horizontal stripes of a class frequency, in noise.

    Both cues survive flips and small shifts, so augmented training must still learn them.
    """
    g = torch.Generator().manual_seed(1234)  # class templates shared by train and test
    colours = torch.rand(NUM_CLASSES, 3, generator=g) * 2 - 1
    rows = torch.arange(16, dtype=torch.float32)
    stripes = torch.stack([torch.sin(2 * math.pi * (1 + c % 5) * rows / 16 + c) for c in range(NUM_CLASSES)])
    templates = colours[:, :, None, None] + 0.7 * stripes[:, None, :, None]
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return (templates[labels] + 0.5 * noise).expand(-1, 3, 16, 16).contiguous(), labels


@pytest.fixture(scope="module")
def data():
    return _patterns(20, seed=0), _patterns(10, seed=1)


def _net(num_classes: int = NUM_CLASSES, seed: int = 0):
    torch.manual_seed(seed)
    return create_net("convnet", num_classes=num_classes, image_size=16, width=16, depth=2)


def test_learns_synthetic_patterns(data):
    (x, y), (tx, ty) = data
    cfg = TrainConfig(epochs=30, batch_size=32)
    result = train(_net(), x, y, cfg, eval_data=(tx, ty))
    assert result.final["train_acc"] > 0.8
    assert result.final["test_acc"] > 0.8  # chance is 0.1
    assert result.final == result.history[-1] and len(result.history) == 30
    assert result.seconds > 0 and result.peak_memory_mb > 0


def test_same_seed_gives_identical_parameters(data):
    (x, y), _ = data
    cfg = TrainConfig(epochs=3, batch_size=64)
    runs = []
    for seed in (7, 7, 8):
        net = _net()
        train(net, x, y, cfg, seed=seed)
        runs.append(flatten_params(net))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("loss", ["mse", "soft_ce_probs", "soft_ce_logits"])
def test_soft_targets_decrease_loss(data, loss):
    (x, y), _ = data
    if loss == "mse":  # KRR-ST style: regress representation vectors of another dimension
        targets = torch.randn(NUM_CLASSES, 8, generator=torch.Generator().manual_seed(0))[y]
        net, name = _net(num_classes=8), "mse"
    else:
        logits = 4 * torch.nn.functional.one_hot(y, NUM_CLASSES).float()
        targets = logits.softmax(1) if loss == "soft_ce_probs" else logits
        net, name = _net(), "soft_ce"
    result = train(net, x, targets, TrainConfig(epochs=10, batch_size=50, loss=name, augment="none"))
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]


def test_non_finite_loss_raises(data):
    (x, y), _ = data
    with pytest.raises(FloatingPointError, match=r"epoch \d+/5, step \d+/4"):
        train(_net(), x, y, TrainConfig(epochs=5, batch_size=50, lr=1e10))
    bad = x.clone()
    bad[3] = float("inf")
    with pytest.raises(FloatingPointError, match="epoch 1/5"):
        train(_net(), bad, y, TrainConfig(epochs=5, batch_size=50, augment="none"))


def test_progress_small_data_and_eval_every(data):
    (x, y), (tx, ty) = data
    calls = []
    cfg = TrainConfig(epochs=5, batch_size=256, eval_every=2)  # batch larger than the 7 images
    result = train(_net(), x[:7], y[:7], cfg, eval_data=(tx, ty), progress=lambda s, t, **m: calls.append((s, t, m)))
    assert [(s, t) for s, t, _ in calls] == [(e, 5) for e in range(1, 6)]
    assert all({"loss", "acc"} <= set(m) for _, _, m in calls)
    assert ["test_acc" in r for r in result.history] == [False, True, False, True, True]


def test_evaluate_and_extract_features(data):
    (x, y), _ = data
    net = _net()
    net.train()
    metrics = evaluate(net, x, y, batch_size=64)
    assert metrics["n"] == len(y) and 0 <= metrics["acc"] <= 1 and metrics["loss"] > 0
    feats = extract_features(net, x, batch_size=64)
    assert feats.shape == (len(x), net.feature_dim) and feats.device.type == "cpu"
    assert net.training, "evaluation must restore the caller's mode"


def test_flip_crop_is_seeded_shape_preserving_and_differentiable():
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    a = flip_crop(x, torch.Generator().manual_seed(0))
    b = flip_crop(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_config_validation_and_augment_registry(data):
    with pytest.raises(ValidationError, match="unknown augment 'nope'; valid: none, flip_crop, dsa"):
        TrainConfig(augment="nope")
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(epoch=3)
    with pytest.raises(ValidationError, match="label_smoothing"):
        TrainConfig(loss="mse", label_smoothing=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register_augment("flip_crop")(lambda x, g: x)
    register_augment("test_negate")(lambda x, g: -x)
    try:
        (x, y), _ = data
        train(_net(), x, y, TrainConfig(epochs=1, augment="test_negate"))
    finally:
        del AUGMENTS["test_negate"]
    with pytest.raises(ValueError, match="needs integer class labels"):
        train(_net(), x, y.float(), TrainConfig(epochs=1))


def test_schedules():
    assert SCHEDULES["step"](0.49) == 1.0 and SCHEDULES["step"](0.5) == pytest.approx(0.1)
    assert SCHEDULES["cosine"](0.0) == 1.0 and SCHEDULES["cosine"](0.5) == pytest.approx(0.5)
    assert SCHEDULES["constant"](0.9) == 1.0


def test_resolve_device(monkeypatch):
    monkeypatch.delenv("DISTILLERY_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected and resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("DISTILLERY_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda"), "an explicit device beats the environment"
    with pytest.raises(ValueError, match='valid forms: "auto", "cpu", "cuda" or "cuda:<index>"'):
        resolve_device("gpu")
    monkeypatch.setenv("DISTILLERY_DEVICE", "tpu")
    with pytest.raises(ValueError, match="DISTILLERY_DEVICE='tpu'"):
        resolve_device("auto")


def test_seed_everything():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))

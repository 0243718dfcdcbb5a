"""Tests for distill.experts: recipes, AST's ramp and gradient penalty, SAM, resume, idempotency."""

import math

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from distill.experts import (
    AST_LOSS_RAMP,
    RECIPES,
    ExpertConfig,
    _gradient_penalty,
    check_not_diverged,
    checkpoint_dir,
    smoothness,
    train_expert,
)
from distill.nets import create_net
from distill.train import AUGMENTS
from distill.trajectory import TrajectoryReader, expert_file

NUM_CLASSES = 3
AUGMENT = "dsa" if "dsa" in AUGMENTS else "flip_crop"


def _data(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 16x16 images: a fixed random template per class plus noise."""
    templates = torch.randn(NUM_CLASSES, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return templates[labels] + 0.8 * noise, labels


TRAIN = _data(30, 1)
TEST = _data(10, 2)


def _cfg(recipe: str = "mtt", **changes) -> ExpertConfig:
    fields = {"net_kwargs": {"width": 8, "depth": 2}, "epochs": 4, "augment": AUGMENT, **changes}
    return ExpertConfig(recipe=recipe, **fields)


def _train(cfg: ExpertConfig, path, expert_id: int = 0, **kwargs) -> dict:
    return train_expert(cfg, *TRAIN, *TEST, num_classes=NUM_CLASSES, expert_id=expert_id, out_path=path, **kwargs)


def _all_snapshots(path) -> list[torch.Tensor]:
    with TrajectoryReader(path) as reader:
        return [reader.snapshot(e) for e in reader.epochs]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_and_writes_epochs_plus_one_snapshots(recipe, tmp_path):
    path = tmp_path / expert_file(3)
    result = _train(_cfg(recipe), path, expert_id=3, dataset_fingerprint="d1", preprocessor_fingerprint="p1")
    assert result["reused"] is False and result["epochs"] == 4 and result["recipe"] == recipe
    assert list(tmp_path.iterdir()) == [path]  # the checkpoint is gone once the trajectory is complete
    net = create_net("convnet", num_classes=NUM_CLASSES, image_size=16, width=8, depth=2)
    with TrajectoryReader(path, layout=net) as reader:
        assert reader.complete and reader.epochs == [0, 1, 2, 3, 4]
        meta = reader.meta
        assert meta["recipe"]["recipe"] == recipe and "num_experts" not in meta["recipe"]
        assert (meta["expert_id"], meta["dataset_fingerprint"], meta["preprocessor_fingerprint"]) == (3, "d1", "p1")
        assert (meta["num_classes"], meta["channels"], meta["image_size"], meta["epochs_planned"]) == (3, 3, 16, 4)
        rows = reader.metrics()
    assert rows[0]["train_loss"] is None and 0 <= rows[0]["test_acc"] <= 1
    for row in rows[1:]:
        values = [row[k] for k in ("train_acc", "train_loss", "loss", "test_acc", "test_loss", "param_change", "lr")]
        assert all(math.isfinite(v) for v in values) and row["param_change"] > 0
    summary = smoothness(TrajectoryReader(path))
    assert summary["epochs"] == [1, 2, 3, 4] and len(summary["param_change"]) == 4
    assert summary["mean_param_change"] > 0 and summary["loss_roughness"] >= 0
    assert -1 <= summary["mean_turn_cosine"] <= 1 and summary["final_test_acc"] == rows[-1]["test_acc"]


def test_experts_learn_the_task(tmp_path):
    result = _train(_cfg(lr=0.05, augment="none", epochs=6), tmp_path / expert_file(0))
    assert result["test_acc"] > 0.8


def test_recipe_presets_and_overrides():
    ast = ExpertConfig(recipe="ast")
    assert (ast.lr, ast.momentum, ast.weight_decay, ast.grad_penalty) == (0.003, 0.9, 1e-3, 2.0)
    assert ast.loss_ramp == AST_LOSS_RAMP and ast.loss_ramp[0] == 0.5 and ast.loss_ramp[-1] == 0.95
    assert ExpertConfig(recipe="ast", lr=0.004).lr == 0.004  # explicit fields win over the preset
    assert ExpertConfig(recipe="sam").sam_rho == 0.01 and ExpertConfig(recipe="sam").lr == 0.01
    mtt = ExpertConfig()
    assert (mtt.lr, mtt.momentum, mtt.weight_decay, mtt.grad_penalty, mtt.loss_ramp) == (0.01, 0, 0, 0, None)
    # AST/MTT drop the lr after their 0-based epoch epochs // 2 + 1: from 1-based epoch 28 of 50.
    assert ast.lr_at(27) == 0.003 and ast.lr_at(28) == pytest.approx(0.003 * 0.6)
    assert mtt.lr_at(50) == 0.01
    assert ast.loss_scale(1) == 0.5 and ast.loss_scale(10) == 0.95 and ast.loss_scale(11) == 1.0
    assert ExpertConfig.model_validate(ast.model_dump()) == ast


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_experts": 0}, "num_experts"),
        ({"epochs": 0}, "epochs"),
        ({"recipe": "tesla"}, "unknown expert recipe 'tesla'; valid: mtt, ast, sam"),
        ({"augment": "mixup"}, "unknown augment 'mixup'"),
        ({"net": "vit"}, "unknown net 'vit'"),
        ({"net_kwargs": {"widht": 8}}, "unknown argument.*widht"),
        # issue 12: a zero width used to die with ZeroDivisionError inside the (Ray) training task
        (
            {"net_kwargs": {"width": 0}},
            r"net 'convnet' got invalid argument\(s\): width=0: .*greater than or equal to 1",
        ),
        ({"net_kwargs": {"depth": 0}}, "depth=0"),
        ({"net_kwargs": {"norm": "bn"}}, "norm='bn': unknown norm 'bn'; valid: instance"),
        ({"loss_ramp": [0.5, -1.0]}, "loss_ramp"),
        ({"momentum": 1.0}, "momentum"),
        ({"colour": 1}, "colour"),
    ],
)
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ValidationError, match=message):
        ExpertConfig(**changes)


def test_ast_ramp_scales_the_loss_and_the_first_step(tmp_path):
    # One SGD step per epoch (90 images < batch 256), no momentum: the step is lr * scale * grad.
    base = dict(augment="none", grad_penalty=0.0, momentum=0.0, weight_decay=0.0, lr=0.01)
    _train(_cfg("ast", **base), tmp_path / "ramp" / expert_file(0))
    _train(_cfg("ast", **base, loss_ramp=None), tmp_path / "flat" / expert_file(0))
    ramp = TrajectoryReader(tmp_path / "ramp" / expert_file(0)).metrics()
    flat = TrajectoryReader(tmp_path / "flat" / expert_file(0)).metrics()
    assert ramp[1]["loss"] == pytest.approx(0.5 * ramp[1]["train_loss"], rel=1e-6)
    assert ramp[2]["loss"] == pytest.approx(0.55 * ramp[2]["train_loss"], rel=1e-6)
    assert flat[1]["loss"] == pytest.approx(flat[1]["train_loss"], rel=1e-6)
    assert ramp[1]["train_loss"] == flat[1]["train_loss"]  # same init and batch
    assert ramp[1]["param_change"] == pytest.approx(0.5 * flat[1]["param_change"], rel=1e-4)


def test_gradient_penalty_matches_its_formula_and_is_differentiable():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(5, 2, 4, 4)
    gp = _gradient_penalty(net, x, weight=2.0)
    # d(sum of logits)/dx = column sums of W, the same for every sample; norm over channels per pixel.
    grad = net[1].weight.sum(0).view(2, 4, 4)
    expected = 2.0 * ((grad.norm(dim=0) - 1) ** 2).mean()
    assert gp.device.type == "cpu" and torch.allclose(gp, expected)
    gp.backward()
    assert net[1].weight.grad is not None and torch.isfinite(net[1].weight.grad).all()


def test_ast_gradient_penalty_is_recorded_and_finite(tmp_path):
    path = tmp_path / expert_file(0)
    _train(_cfg("ast", epochs=2), path, device="cpu")
    rows = TrajectoryReader(path).metrics()[1:]
    for row in rows:
        assert math.isfinite(row["grad_penalty"]) and row["grad_penalty"] > 0
        scale = AST_LOSS_RAMP[row["epoch"] - 1]
        assert row["loss"] == pytest.approx(scale * row["train_loss"] + row["grad_penalty"], rel=1e-5)
    assert TrajectoryReader(path).metrics()[1]["lr"] == 0.003


def test_sam_takes_different_steps_from_plain_sgd(tmp_path):
    _train(_cfg("mtt", lr=0.05), tmp_path / "sgd" / expert_file(0))
    _train(_cfg("sam", lr=0.05, sam_rho=0.05), tmp_path / "sam" / expert_file(0))
    sgd, sam = _all_snapshots(tmp_path / "sgd" / expert_file(0)), _all_snapshots(tmp_path / "sam" / expert_file(0))
    assert torch.equal(sgd[0], sam[0])  # same (seed, expert_id) -> same init
    assert not torch.equal(sgd[1], sam[1]) and all(torch.isfinite(s).all() for s in sam)


class _Crash(Exception):
    pass


def _crash_after(epoch: int):
    def progress(step, total, **metrics):
        if step == epoch:
            raise _Crash(f"simulated crash after epoch {step}")

    return progress


@pytest.mark.parametrize("recipe", ["ast", "sam"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(recipe, tmp_path):
    cfg = _cfg(recipe, batch_size=32)  # 3 steps per epoch: momentum, augmentation and shuffling state matter
    whole = tmp_path / "whole" / expert_file(5)
    _train(cfg, whole, expert_id=5)

    resumed = tmp_path / "resumed" / expert_file(5)
    with pytest.raises(_Crash):
        _train(cfg, resumed, expert_id=5, progress=_crash_after(2))
    assert not resumed.exists() and checkpoint_dir(resumed).is_dir()
    result = _train(cfg, resumed, expert_id=5)
    assert result["resumed_from"] == 2 and not checkpoint_dir(resumed).exists()

    assert all(torch.equal(a, b) for a, b in zip(_all_snapshots(whole), _all_snapshots(resumed), strict=True))
    assert TrajectoryReader(whole).metrics() == TrajectoryReader(resumed).metrics()


def test_resume_with_another_config_is_refused(tmp_path):
    path = tmp_path / expert_file(0)
    with pytest.raises(_Crash):
        _train(_cfg(), path, progress=_crash_after(1))
    with pytest.raises(ValueError, match=r"checkpoint .*expert-00000\.ckpt was made with a different config.*recipe"):
        _train(_cfg(lr=0.02), path)
    with pytest.raises(ValueError, match="different configuration.*dataset_fingerprint"):
        _train(_cfg(), path, dataset_fingerprint="other")
    assert _train(_cfg(), path)["resumed_from"] == 1


def test_a_finished_expert_is_not_retrained(tmp_path):
    path = tmp_path / expert_file(0)
    first = _train(_cfg(), path)
    stamp = path.stat().st_mtime_ns
    again = _train(_cfg(num_experts=7), path, progress=_crash_after(1))  # num_experts is not part of an expert
    assert again["reused"] is True and path.stat().st_mtime_ns == stamp
    assert {k: again[k] for k in ("test_acc", "train_loss")} == {k: first[k] for k in ("test_acc", "train_loss")}
    with pytest.raises(ValueError, match=r"trajectory .*expert-00000\.parquet was made with a different configuration"):
        _train(_cfg(epochs=5), path)


def test_non_finite_loss_names_expert_epoch_and_step(tmp_path):
    x, y = TRAIN[0].clone(), TRAIN[1]
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at epoch 1/4 of expert 4, step 1/1"):
        train_expert(
            _cfg(augment="none"), x, y, *TEST, num_classes=NUM_CLASSES, expert_id=4, out_path=tmp_path / expert_file(4)
        )
    assert not (tmp_path / expert_file(4)).exists()


def test_bad_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\)"):
        train_expert(_cfg(), *TRAIN, *TEST, num_classes=2, expert_id=0, out_path=tmp_path / expert_file(0))


@pytest.mark.parametrize(
    "lr, message",
    [
        (1e6, r"non-finite training loss at epoch \d/4 of expert 0.*lr 1000000.0\); lower the lr"),
        # a loss that stays finite but explodes (issue 12 part 4): refused at the end, not published
        (
            30.0,
            r"expert 0 diverged: final train loss .* after 4 epochs is above 10x the untrained net's loss .*"
            r"lr 30.0\); lower lr",
        ),
    ],
)
def test_a_diverged_expert_is_refused_and_nothing_is_left(lr, message, tmp_path):
    path = tmp_path / expert_file(0)
    with pytest.raises(FloatingPointError, match=message):
        _train(_cfg(lr=lr), path)
    assert not path.exists() and not checkpoint_dir(path).exists(), "nothing published, no checkpoint to resume into"
    assert list(tmp_path.iterdir()) == []


def test_divergence_bound():
    check_not_diverged(2.3, 23.0, _cfg(), 4)
    with pytest.raises(FloatingPointError, match="expert 4 diverged: final train loss 23.1 .* loss 2.3 "):
        check_not_diverged(2.3, 23.1, _cfg(), 4)
    with pytest.raises(FloatingPointError, match="final train loss nan"):
        check_not_diverged(2.3, float("nan"), _cfg(), 4)

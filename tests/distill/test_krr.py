"""Tests for distill.krr: the KRR solve, the model pool's reset schedule, resume, transfer, bad input."""

import pytest
import torch
from pydantic import ValidationError

from distill.krr import (
    METHODS,
    KRRConfig,
    OnlinePool,
    TransferConfig,
    check_labels,
    init_indices,
    krr_distill,
    krr_predict,
    pretrained_backbone,
    transfer,
    with_bias,
)
from distill.nets import create_net
from distill.train import TrainConfig

SOURCE = torch.randn(80, 3, 16, 16, generator=torch.Generator().manual_seed(0))
NET = {"widths": [4, 8]}


def _teacher(out_widths=(4, 8)) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_net("convnet_bn", num_classes=1, image_size=16, widths=list(out_widths)).eval()


def _cfg(**changes) -> KRRConfig:
    fields = {
        "num_images": 10,
        "net_kwargs": NET,
        "num_models": 2,
        "online_iterations": 4,
        "outer_steps": 9,
        "real_batch": 32,
        "checkpoint_every": 3,
        **changes,
    }
    return KRRConfig(**fields)


def _ridge_lstsq(f_syn, f_real, y, ridge):
    """Primal ridge regression as one least-squares system [F; sqrt(lam) I] W = [Y; 0]."""
    lam = ridge * torch.trace(f_syn @ f_syn.T)
    d = f_syn.shape[1]
    a = torch.cat([f_syn, lam.sqrt() * torch.eye(d, dtype=f_syn.dtype)])
    b = torch.cat([y, torch.zeros(d, y.shape[1], dtype=y.dtype)])
    return f_real @ torch.linalg.lstsq(a, b).solution


@pytest.mark.parametrize(("n", "d"), [(12, 5), (4, 9)])  # more and fewer samples than features
def test_krr_solve_matches_direct_least_squares_with_bias(n, d):
    g = torch.Generator().manual_seed(n)
    f_syn = with_bias(torch.randn(n, d, generator=g, dtype=torch.float64))
    f_real = with_bias(torch.randn(7, d, generator=g, dtype=torch.float64))
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    for ridge in (1e-6, 1e-2):
        torch.testing.assert_close(krr_predict(f_syn, f_real, y, ridge), _ridge_lstsq(f_syn, f_real, y, ridge))


def test_bias_column_fits_a_constant_offset():
    # Targets = features @ w + 5: with the bias column KRR reproduces the offset on new points.
    g = torch.Generator().manual_seed(3)
    f_syn, f_real = (
        torch.randn(40, 3, generator=g, dtype=torch.float64),
        torch.randn(6, 3, generator=g, dtype=torch.float64),
    )
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    pred = krr_predict(with_bias(f_syn), with_bias(f_real), f_syn @ w + 5.0, 1e-9)
    torch.testing.assert_close(pred, f_real @ w + 5.0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("features", ["duplicates", "dead"])
def test_singular_kernel_stays_solvable_thanks_to_the_lambda_rule(features):
    f = (
        torch.randn(1, 6, dtype=torch.float64).repeat(8, 1)
        if features == "duplicates"
        else torch.zeros(8, 6, dtype=torch.float64)
    )
    f_syn = with_bias(f)
    k_ss = f_syn @ f_syn.T
    assert torch.linalg.matrix_rank(k_ss) == 1, "the kernel itself is singular"
    y = torch.randn(8, 4, dtype=torch.float64)
    f_real = with_bias(torch.randn(5, 6, dtype=torch.float64))
    pred = krr_predict(f_syn, f_real, y, 1e-6)
    assert torch.isfinite(pred).all()
    torch.testing.assert_close(pred, _ridge_lstsq(f_syn, f_real, y, 1e-6))
    # The gradient to the synthetic features is finite too (what the outer step differentiates).
    f_syn = f_syn.clone().requires_grad_(True)
    krr_predict(f_syn, f_real, y, 1e-6).sum().backward()
    assert torch.isfinite(f_syn.grad).all()


def test_pool_has_staggered_ages_and_resets_them_after_the_budget():
    cfg = _cfg(num_models=2, online_iterations=4)
    x, y = SOURCE[:10], torch.randn(10, 128)
    nets = []

    def make(seed):
        torch.manual_seed(seed)
        nets.append(create_net("convnet_bn", num_classes=128, image_size=16, **NET))
        return nets[-1]

    pool = OnlinePool(cfg, make, x, y)
    assert pool.ages == [0, 2] and pool.resets == [0, 0]  # slot i starts at i * T / M
    pool.update(1, x, y)
    assert pool.ages == [0, 3]
    old = pool.model(1)
    pool.update(1, x, y)  # 4th step of slot 1: budget spent, a fresh net at age 0
    assert pool.ages == [0, 0] and pool.resets == [0, 1] and pool.model(1) is not old
    pool.update(1, x, y)  # the reset slot trains again (the reference re-initializes it forever)
    assert pool.ages == [0, 1] and pool.resets == [0, 1]
    for _ in range(4):
        pool.update(0, x, y)
    assert pool.ages == [0, 1] and pool.resets == [1, 1]
    assert len(nets) == 4, "two initial nets and one fresh net per reset"


def test_pool_bookkeeping_over_a_run():
    cfg = _cfg(outer_steps=20, num_models=3, online_iterations=4)
    result = krr_distill(cfg, SOURCE, _teacher())
    ages, resets = result.pool["ages"], result.pool["resets"]
    initial = sum(i * 4 // 3 for i in range(3))
    assert sum(ages) + 4 * sum(resets) == initial + 20 and all(0 <= a < 4 for a in ages)


def test_distillation_shapes_history_and_random_feature_mode():
    for mode in ("online", "random-features"):
        seen = []
        result = krr_distill(
            _cfg(pool_mode=mode), SOURCE, _teacher(), progress=lambda s, t, seen=seen, **m: seen.append(s)
        )
        assert result.images.shape == (10, 3, 16, 16) and result.targets.shape == (10, 128)
        assert seen == list(range(1, 10)) and len(result.history) == 9
        assert result.history[0]["lr"] == pytest.approx(1e-3) and result.history[-1]["lr"] == pytest.approx(1e-4)
        assert not torch.equal(result.images, SOURCE[result.source_indices]), "X_s moved"
    assert result.pool == {"mode": "random-features", "draws": 9}


def test_outer_loss_goes_down():
    cfg = _cfg(num_images=20, outer_steps=60, outer_lr=0.01, real_batch=80, augment="none", pool_mode="random-features")
    losses = [h["loss"] for h in krr_distill(cfg, SOURCE, _teacher()).history]
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10])


def test_interrupted_distillation_resumes_to_the_same_result(tmp_path):
    whole = krr_distill(_cfg(), SOURCE, _teacher(), work_dir=tmp_path / "a")

    def crash(step, total, **metrics):
        if step == 7:
            raise KeyboardInterrupt("simulated crash at step 7")

    with pytest.raises(KeyboardInterrupt):
        krr_distill(_cfg(), SOURCE, _teacher(), work_dir=tmp_path / "b", progress=crash)
    resumed = krr_distill(_cfg(), SOURCE, _teacher(), work_dir=tmp_path / "b")
    assert resumed.resumed_from == 6  # the last checkpoint before the crash
    assert torch.equal(resumed.images, whole.images) and torch.equal(resumed.targets, whole.targets)
    assert resumed.history == whole.history and resumed.pool == whole.pool
    done = krr_distill(_cfg(), SOURCE, _teacher(), work_dir=tmp_path / "b")
    assert done.resumed_from == 9 and torch.equal(done.images, whole.images), "a finished run returns at once"
    with pytest.raises(ValueError, match="different configuration"):
        krr_distill(_cfg(outer_lr=0.5), SOURCE, _teacher(), work_dir=tmp_path / "b")


def test_more_synthetic_than_source_images_is_refused():
    with pytest.raises(ValueError, match="num_images=81 .* only 80 images"):
        krr_distill(_cfg(num_images=81), SOURCE, _teacher())
    assert len(init_indices(80, _cfg(num_images=80))) == 80


def test_targets_of_another_teacher_size_are_refused():
    with pytest.raises(ValueError, match=r"targets are \(10, 64\) .* 128 dimensions"):
        krr_distill(_cfg(), SOURCE, _teacher(), init_targets=torch.zeros(10, 64))


def test_non_finite_loss_stops_with_a_clear_message():
    bad = SOURCE.clone()
    bad[:, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="outer step 1/9.*lower outer_lr"):
        krr_distill(_cfg(), bad, _teacher())


def test_bad_config_lists_valid_choices():
    with pytest.raises(ValidationError, match="valid: online, random-features"):
        _cfg(pool_mode="trained")
    with pytest.raises(ValidationError, match="unknown augment 'mixup'; valid: none, flip_crop, dsa"):
        _cfg(augment="mixup")
    with pytest.raises(ValidationError, match=r"net 'convnet_bn' got invalid argument\(s\): widths\[1\]=0"):
        _cfg(net_kwargs={"widths": [8, 0]})


TINY_TRANSFER = TransferConfig(
    net="convnet_bn",
    net_kwargs=NET,
    pretrain=TrainConfig(epochs=2, batch_size=8, lr=0.01, loss="mse", augment="none"),
    linear_probe=TrainConfig(epochs=2, batch_size=16, lr=0.1, augment="none"),
    fine_tune=TrainConfig(epochs=1, batch_size=16, lr=0.01, augment="flip_crop"),
)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_pretrains_and_transfers(method):
    images, targets, labels = SOURCE[:10], torch.randn(10, 128), torch.arange(10) % 3
    backbone, info = pretrained_backbone(
        method,
        TINY_TRANSFER,
        image_shape=(3, 16, 16),
        images=images,
        targets=targets,
        labels=labels,
        teacher=_teacher(),
        seed=0,
    )
    target_x, target_y = SOURCE[:40], torch.arange(40) % 2
    row = transfer(backbone, target_x[:30], target_y[:30], target_x[30:], target_y[30:], TINY_TRANSFER, num_classes=2)
    assert 0 <= row["linear_probe_acc"] <= 1 and 0 <= row["fine_tune_acc"] <= 1
    assert ("pretrain_loss" in info) == (METHODS[method].data in ("distilled", "initial"))


def test_unlabelled_source_is_refused_where_labels_are_needed():
    with pytest.raises(ValueError, match="'random-real-ce' .* unlabelled .*1 distinct label"):
        pretrained_backbone(
            "random-real-ce",
            TINY_TRANSFER,
            image_shape=(3, 16, 16),
            images=SOURCE[:10],
            labels=torch.zeros(10, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="no labels"):
        check_labels("random-real-ce", None)
    with pytest.raises(ValueError, match="unknown method.*valid: krr-st"):
        pretrained_backbone("kip", TINY_TRANSFER, image_shape=(3, 16, 16))

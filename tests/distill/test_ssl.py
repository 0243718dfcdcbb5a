"""Tests for distill.ssl: the Barlow Twins loss on known cases, teacher training, reuse and resume."""

import pytest
import torch
from pydantic import ValidationError

from distill.ssl import SSLConfig, barlow_twins_loss, load_teacher, teacher_metadata, train_teacher

# Two standardized, orthogonal columns over a batch of 4 (a 4x2 Hadamard block): C = I.
ORTHO = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def test_loss_is_zero_when_views_agree_and_features_decorrelate():
    assert barlow_twins_loss(ORTHO, ORTHO, 5e-3).item() == pytest.approx(0.0, abs=1e-8)


def test_loss_of_anti_correlated_views_is_four_per_feature():
    # C = -I: each diagonal term is (1 - (-1))^2 = 4, off-diagonals are 0.
    assert barlow_twins_loss(ORTHO, -ORTHO, 5e-3).item() == pytest.approx(8.0, rel=1e-4)


def test_redundant_features_pay_the_off_diagonal_weight():
    # Two identical features: C = [[1, 1], [1, 1]], so the loss is weight * 2.
    z = ORTHO[:, :1].repeat(1, 2)
    assert barlow_twins_loss(z, z, 0.25).item() == pytest.approx(0.5, rel=1e-4)


def test_loss_ignores_per_feature_scale_and_shift():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g)
    expected = barlow_twins_loss(z1, z2, 5e-3)
    assert barlow_twins_loss(3 * z1 + 7, z2 * 0.5 - 1, 5e-3).item() == pytest.approx(expected.item(), rel=1e-4)


def test_loss_refuses_mismatched_or_single_sample_batches():
    with pytest.raises(ValueError, match="N>=2"):
        barlow_twins_loss(torch.ones(1, 3), torch.ones(1, 3), 5e-3)
    with pytest.raises(ValueError, match="one shape"):
        barlow_twins_loss(torch.ones(4, 3), torch.ones(4, 2), 5e-3)


def test_config_refuses_unknown_net():
    with pytest.raises(ValidationError, match="unknown net 'vgg'; valid: convnet"):
        SSLConfig(net="vgg", net_kwargs={})


IMAGES = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
CFG = SSLConfig(net_kwargs={"widths": [4, 8]}, projector=[16, 16], epochs=3, batch_size=32)


def test_teacher_trains_saves_and_is_reused(tmp_path):
    seen = []
    first = train_teacher(
        CFG, IMAGES, out_dir=tmp_path, dataset_fingerprint="d", progress=lambda s, t, **m: seen.append((s, t))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)] and not first["reused"]
    assert first["feature_dim"] == 8 * 4 * 4 and len(first["history"]) == 3
    assert not (tmp_path / "ckpt").exists(), "the checkpoint is removed once the teacher is written"
    teacher = load_teacher(first["path"])
    assert teacher.embed(IMAGES[:5]).shape == (5, 128)
    assert teacher_metadata(first["path"])["config"]["epochs"] == 3
    again = train_teacher(CFG, IMAGES, out_dir=tmp_path, dataset_fingerprint="d")
    assert again["reused"] and again["fingerprint"] == first["fingerprint"]
    with pytest.raises(ValueError, match="another configuration"):
        train_teacher(CFG, IMAGES, out_dir=tmp_path, dataset_fingerprint="other")


def test_interrupted_teacher_resumes_bit_identically(tmp_path):
    whole = train_teacher(CFG, IMAGES, out_dir=tmp_path / "a")

    def crash(step, total, **metrics):
        if step == 2:
            raise KeyboardInterrupt("simulated crash after epoch 2")

    with pytest.raises(KeyboardInterrupt):
        train_teacher(CFG, IMAGES, out_dir=tmp_path / "b", progress=crash)
    resumed = train_teacher(CFG, IMAGES, out_dir=tmp_path / "b")
    assert resumed["resumed_from"] == 2
    assert resumed["history"] == whole["history"]
    a, b = load_teacher(whole["path"]).state_dict(), load_teacher(resumed["path"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

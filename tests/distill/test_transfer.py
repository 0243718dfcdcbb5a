"""The shared transfer recipe (distill.transfer): pretraining by loss, linear probe, fine-tune."""

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from distill.train import TrainConfig
from distill.transfer import TransferConfig, backbone, fine_tune, linear_probe, pretrain, transfer

PROBE = TrainConfig(
    epochs=60, batch_size=32, lr=0.05, optimizer="adam", weight_decay=0.0, schedule="cosine", augment="none"
)
QUICK = TrainConfig(
    epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=0.0, schedule="cosine", augment="flip_crop"
)
SMALL = TransferConfig(net_kwargs={"width": 4, "depth": 2}, pretrain=QUICK, linear_probe=PROBE, fine_tune=QUICK)


class Features(nn.Module):
    """A backbone whose features are its input times `scale` (a frozen identity map), plus a head."""

    def __init__(self, dim: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.features = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(dim) * scale)
        self.feature_dim = dim
        self.classifier = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _clusters(n_per_class: int, num_classes: int, dim: int, seed: int, spread: float = 0.3):
    """Gaussian clusters around well separated centres: linearly separable with margin."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 4.0
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def _images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_linear_probe_separates_separable_features_and_leaves_the_backbone_alone():
    x, y = _clusters(20, 4, 16, seed=0)
    tx, ty = _clusters(25, 4, 16, seed=1)
    net = Features(16, 4)
    before = _state(net)
    head, r = linear_probe(net, x, y, tx, ty, PROBE, num_classes=4, seed=0)
    assert r["test_acc"] == 1.0 and r["train_acc"] == 1.0
    assert head.out_features == 4 and head.in_features == 16
    assert _same(before, _state(net)), "the probe must not touch the backbone"


def test_linear_probe_is_at_chance_when_labels_carry_no_signal():
    x, _ = _clusters(30, 4, 16, seed=0)
    tx, _ = _clusters(50, 4, 16, seed=1)
    g = torch.Generator().manual_seed(3)
    y, ty = torch.randint(4, (len(x),), generator=g), torch.randint(4, (len(tx),), generator=g)
    _, r = linear_probe(Features(16, 4), x, y, tx, ty, PROBE, num_classes=4, seed=0)
    assert r["test_acc"] < 0.45  # 4 classes: chance is 0.25; separable labels reach 1.0 above


def test_linear_probe_does_not_depend_on_the_feature_scale():
    # Standardized features: one probe lr fits a backbone whose features are 1000x larger.
    x, y = _clusters(10, 3, 8, seed=0, spread=2.0)
    tx, ty = _clusters(30, 3, 8, seed=1, spread=2.0)
    _, small = linear_probe(Features(8, 3, scale=1e-3), x, y, tx, ty, PROBE, num_classes=3, seed=0)
    _, large = linear_probe(Features(8, 3, scale=1e3), x, y, tx, ty, PROBE, num_classes=3, seed=0)
    assert small["test_acc"] == pytest.approx(large["test_acc"], abs=1e-6)


def test_fine_tune_changes_a_copy_of_the_backbone_not_the_original():
    net = backbone(SMALL, (3, 8, 8), out_dim=5, seed=0)
    before = _state(net)
    x, y = _images(32, 0), torch.arange(32) % 3
    tuned, r = fine_tune(net, x, y, _images(12, 1), torch.arange(12) % 3, QUICK, num_classes=3, seed=0)
    assert _same(before, _state(net)), "fine-tuning must leave the pretrained backbone as it was"
    changed = [k for k, v in tuned.features.state_dict().items() if not torch.equal(v, net.features.state_dict()[k])]
    assert any(k.endswith("weight") for k in changed), "fine-tuning trains the backbone's weights"
    assert tuned.classifier.out_features == 3 and 0 <= r["test_acc"] <= 1


def test_pretrain_by_loss():
    x = _images(24, 0)
    labels = torch.arange(24) % 3
    net, info = pretrain(SMALL, x, labels, loss="ce", out_dim=10, seed=0)
    assert net.classifier.out_features == 10, "a pruned source keeps one output per source class"
    assert info["train_images"] == 24 and info["images_seen"] == 24 * QUICK.epochs and info["pretrain_seconds"] > 0
    assert not _same(_state(net), _state(backbone(SMALL, (3, 8, 8), 10, 0))), "ce pretraining trains"
    net, info = pretrain(SMALL, x, torch.randn(24, 7), loss="mse", seed=0)
    assert net.classifier.out_features == 7 and "pretrain_loss" in info
    fresh, info = pretrain(SMALL, None, None, loss="none", image_shape=(3, 8, 8), seed=4)
    assert _same(_state(fresh), _state(backbone(SMALL, (3, 8, 8), 1, 4))) and info["images_seen"] == 0


class _Killed(Exception):
    pass


@pytest.mark.parametrize("net_kwargs", [{"width": 4, "depth": 2}, {"width": 4, "depth": 2, "norm": "batch"}])
def test_pretraining_killed_mid_run_resumes_bit_identical(tmp_path, net_kwargs):
    """Issue 17: pretraining commits a checkpoint per epoch (net incl. batch-norm statistics, momentum,
    cosine schedule, sampling and augmentation generator) and a restart continues from it."""
    cfg = SMALL.model_copy(update={"net_kwargs": net_kwargs, "pretrain": QUICK.model_copy(update={"epochs": 4})})
    x, labels = _images(40, 1), torch.arange(40) % 5
    whole, info = pretrain(cfg, x, labels, loss="ce", seed=3)

    def kill_after_epoch_2(epoch, epochs, **_):
        if epoch == 2:
            raise _Killed

    with pytest.raises(_Killed):
        pretrain(cfg, x, labels, loss="ce", seed=3, work_dir=tmp_path, progress=kill_after_epoch_2)
    seen = []
    resumed, again = pretrain(
        cfg, x, labels, loss="ce", seed=3, work_dir=tmp_path, progress=lambda e, n, **_: seen.append(e)
    )
    assert seen == [3, 4], "the two committed epochs are not trained again"
    assert _same(_state(resumed), _state(whole))
    assert again["pretrain_loss"] == info["pretrain_loss"] and again["pretrain_train_acc"] == info["pretrain_train_acc"]
    # another recipe or other data is refused, naming the difference
    from distill.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="data: stored"):
        pretrain(cfg, x + 1, labels, loss="ce", seed=3, work_dir=tmp_path)


def test_pretrain_refuses_mismatched_inputs():
    x = _images(8, 0)
    with pytest.raises(ValueError, match="'ce' needs integer labels"):
        pretrain(SMALL, x, torch.randn(8, 3), loss="ce")
    with pytest.raises(ValueError, match="'mse' needs float targets"):
        pretrain(SMALL, x, torch.arange(8), loss="mse")
    with pytest.raises(ValueError, match="out_dim=2 but the labels go up to 7"):
        pretrain(SMALL, x, torch.arange(8), loss="ce", out_dim=2)
    with pytest.raises(ValueError, match="image_shape"):
        pretrain(SMALL, None, None, loss="none")


def test_transfer_runs_the_configured_modes_only():
    net = backbone(SMALL, (3, 8, 8), out_dim=1, seed=0)
    x, y, tx, ty = _images(20, 0), torch.arange(20) % 2, _images(10, 1), torch.arange(10) % 2
    row = transfer(net, x, y, tx, ty, SMALL, num_classes=2)
    assert set(row) == {f"{m}_{k}" for m in ("linear_probe", "fine_tune") for k in ("acc", "train_acc", "seconds")}
    only = transfer(net, x, y, tx, ty, SMALL.model_copy(update={"modes": ["linear_probe"]}), num_classes=2)
    assert set(only) == {"linear_probe_acc", "linear_probe_train_acc", "linear_probe_seconds"}
    assert only["linear_probe_acc"] == row["linear_probe_acc"], "seeded: the same probe twice"
    with pytest.raises(ValueError, match="needs train and test images"):
        transfer(net, x, y, tx[:0], ty[:0], SMALL, num_classes=2)


def test_config_refuses_unknown_modes_and_bad_nets():
    with pytest.raises(ValidationError):
        TransferConfig(modes=["probe"])
    with pytest.raises(ValidationError):
        TransferConfig(modes=[])
    with pytest.raises(ValidationError, match="unknown net 'vgg'"):
        TransferConfig(net="vgg")

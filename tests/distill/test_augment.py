"""Tests for distill.augment (DSA): shapes, gradients, seeding, each family's geometry, replay."""

import math
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from distill.augment import FAMILIES, DSAConfig, DSAParams, apply_params, dsa, sample_params
from distill.nets import create_net
from distill.train import AUGMENTS, TrainConfig, train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(n: int = 8, size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _only(family: str) -> DSAConfig:
    return DSAConfig(strategy=family, mode="all")


def _identity(n: int, *families: str, **overrides) -> DSAParams:
    """Parameters that leave images unchanged, except for the fields in overrides."""
    params = DSAParams(
        families=families,
        brightness=torch.zeros(n),
        saturation=torch.ones(n),
        contrast=torch.ones(n),
        crop=torch.full((n, 2), 0.5),  # the middle of -s..s: no shift
        ratio_crop_pad=0.125,
        cutout=torch.zeros(n, 2),
        ratio_cutout=0.5,
        flip=torch.zeros(n, dtype=torch.bool),
        scale=torch.ones(n, 2),
        rotate=torch.zeros(n),
    )
    return replace(params, **overrides)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", [_only(f) for f in FAMILIES] + [DSAConfig(), DSAConfig(mode="all")], ids=str)
def test_shape_and_dtype_preserved(cfg, dtype):
    x = _images(dtype=dtype)
    out = dsa(x, cfg, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_input(family):
    x = _images().requires_grad_(True)
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    (dsa(x, _only(family), generator=torch.Generator().manual_seed(0)) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Every family is linear in x for fixed parameters, so the analytic Jacobian must be exact.
    params = sample_params(2, _only(family), torch.Generator().manual_seed(3))
    small = _images(n=2, size=6, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: apply_params(t, params), (small,))


@pytest.mark.parametrize("cfg", [DSAConfig(), DSAConfig(mode="all")], ids=["single", "all"])
def test_seeded(cfg):
    x = _images(n=32)
    a = dsa(x, cfg, generator=torch.Generator().manual_seed(7))
    b = dsa(x, cfg, generator=torch.Generator().manual_seed(7))
    c = dsa(x, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_differ_between_samples(family):
    x = _images(n=1).expand(16, -1, -1, -1)
    out = dsa(x, _only(family), generator=torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 1


def test_parameter_ranges():
    cfg = DSAConfig()
    p = sample_params(4096, cfg, torch.Generator().manual_seed(0))
    assert p.n == 4096
    assert p.brightness.min() >= -0.5 and p.brightness.max() <= 0.5
    assert p.saturation.min() >= 0 and p.saturation.max() <= 2
    assert p.contrast.min() >= 0.5 and p.contrast.max() <= 1.5
    assert p.scale.min() >= 1 / 1.2 and p.scale.max() <= 1.2
    assert p.rotate.abs().max() <= math.radians(15)
    assert 0.45 < p.flip.float().mean() < 0.55
    assert p.crop.min() >= 0 and p.crop.max() < 1 and p.cutout.min() >= 0 and p.cutout.max() < 1


def test_single_mode_picks_each_family_uniformly():
    g = torch.Generator().manual_seed(0)
    counts = Counter(sample_params(1, DSAConfig(), g).families for _ in range(1200))
    assert set(counts) == {(f,) for f in FAMILIES}
    assert all(150 < c < 250 for c in counts.values())
    assert sample_params(1, DSAConfig(mode="all"), g).families == FAMILIES


def test_forced_flip_is_torch_flip():
    x = _images(n=2)
    flip = torch.tensor([True, False])
    out = dsa(x, params=_identity(2, "flip", flip=flip))
    assert torch.equal(out[0], torch.flip(x[0], dims=[2])) and torch.equal(out[1], x[1])


def _bright_pixel(n: int, size: int = 32) -> torch.Tensor:
    x = torch.zeros(n, 3, size, size)
    x[:, :, size // 2, size // 2] = 1.0
    return x


def test_crop_shifts_by_whole_pixels_within_the_bound():
    x = _bright_pixel(64)
    out = dsa(x, _only("crop"), generator=torch.Generator().manual_seed(0))
    shifts = set()
    for o in out:
        assert o.sum() == 3 and torch.equal(o[0], o[1])  # the pixel is moved whole, in every channel
        row, col = (o[0] == 1).nonzero()[0].tolist()
        shifts.add((row - 16, col - 16))
    assert all(abs(dr) <= 4 and abs(dc) <= 4 for dr, dc in shifts)  # 12.5% of 32 px
    assert len(shifts) > 10
    # A forced shift of the sampling window by (3, -2) moves the content by (-3, +2).
    shift, bound = torch.tensor([[3.0, -2.0]]), 4
    out = dsa(x[:1], params=_identity(1, "crop", crop=(shift + bound + 0.5) / (2 * bound + 1)))
    assert out[0, 0, 13, 18] == 1 and out.sum() == 3


def test_crop_fills_with_zeros():
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()  # the largest uniform
    out = dsa(torch.ones(1, 1, 32, 32), params=_identity(1, "crop", crop=torch.tensor([[0.0, below_one]])))
    # shift (-4, +4), the extremes: the top 4 rows and the right 4 columns come from outside the image
    assert out[0, 0, :4].abs().sum() == 0 and out[0, 0, :, -4:].abs().sum() == 0
    assert out[0, 0, 4:, :-4].eq(1).all()


def test_cutout_zeroes_a_quarter_square():
    x = torch.rand(256, 3, 32, 32) + 1  # no zeros before cutout
    out = dsa(x[:1], params=_identity(1, "cutout", cutout=torch.full((1, 2), 0.5)))
    zeros = out[0, 0] == 0
    assert zeros.sum() == 16 * 16 and zeros[8:24, 8:24].all()
    out = dsa(x, _only("cutout"), generator=torch.Generator().manual_seed(0))
    fraction = (out[:, 0] == 0).float().mean((1, 2))
    assert torch.equal((out == 0).all(1), out[:, 0] == 0)  # all channels cut together
    # at most a quarter; less on average because squares centred near the border are clipped
    assert fraction.max() <= 0.25 and 0.12 < fraction.mean() < 0.25


def test_color_matches_mtt_formula():
    x = _images(n=2)
    b, s, c = torch.tensor([0.3, -0.2]), torch.tensor([1.5, 0.2]), torch.tensor([0.7, 1.2])
    out = dsa(x, params=_identity(2, "color", brightness=b, saturation=s, contrast=c))
    expected = x + b.view(-1, 1, 1, 1)
    gray = expected.mean(1, keepdim=True)
    expected = (expected - gray) * s.view(-1, 1, 1, 1) + gray
    mean = expected.mean((1, 2, 3), keepdim=True)
    expected = (expected - mean) * c.view(-1, 1, 1, 1) + mean
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("family", ["scale", "rotate"])
def test_identity_warp_is_identity(family):
    x = _images(n=4, size=32)
    torch.testing.assert_close(dsa(x, params=_identity(4, family)), x, atol=1e-4, rtol=0)  # float32 grid rounding


def test_warps_move_content():
    # align_corners=True: pixel centres 0..31 map to [-1, 1], so these warps land on whole pixels
    x = _bright_pixel(1)
    x[:, :, 16, 24] = 1.0
    quarter = dsa(x, params=_identity(1, "rotate", rotate=torch.tensor([math.pi / 2])))[0, 0]
    assert quarter[15, 16] == pytest.approx(1, abs=1e-5) and quarter[7, 16] == pytest.approx(1, abs=1e-5)
    assert quarter.sum() == pytest.approx(2, abs=1e-4)
    # x scale 0.5 samples half the width: the centre pixel is stretched to twice its width, in row 16
    wide = dsa(_bright_pixel(1), params=_identity(1, "scale", scale=torch.tensor([[0.5, 1.0]])))[0, 0]
    torch.testing.assert_close(wide[16, 15:19], torch.tensor([0.25, 0.75, 0.75, 0.25]))
    assert wide.sum() == pytest.approx(2) and wide[16].sum() == wide.sum()


@pytest.mark.parametrize("cfg", [DSAConfig(), DSAConfig(mode="all")], ids=["single", "all"])
def test_params_replay_gives_identical_outputs_and_gradients(cfg):
    params = sample_params(16, cfg, torch.Generator().manual_seed(5))
    outs, grads = [], []
    for _ in range(2):
        x = _images(n=16).requires_grad_(True)
        out = dsa(x, params=params)
        (out**2).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    # the same generator state through dsa() draws the same parameters
    assert torch.equal(outs[0], dsa(_images(n=16), cfg, generator=torch.Generator().manual_seed(5)))


def test_one_parameter_set_serves_batches_of_any_size():
    params = sample_params(1, DSAConfig(mode="all"), torch.Generator().manual_seed(0))
    real, syn = _images(n=6), _images(n=2, seed=1)
    joint = dsa(torch.cat([real, syn]), params=params)
    torch.testing.assert_close(joint, torch.cat([dsa(real, params=params), dsa(syn, params=params)]))
    same = dsa(_images(n=1).expand(5, -1, -1, -1), params=params)
    assert all(torch.equal(same[0], s) for s in same)
    with pytest.raises(ValueError, match="drawn for 16 samples cannot augment a batch of 8"):
        dsa(_images(n=8), params=sample_params(16))


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_augmentation_on_every_device(device):
    x = _images(n=8)
    for cfg in [_only(f) for f in FAMILIES]:
        expected = dsa(x, cfg, generator=torch.Generator().manual_seed(0))
        out = dsa(x.to(device), cfg, generator=torch.Generator().manual_seed(0))
        assert out.device.type == device
        torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_config_errors():
    valid = "valid families: color, crop, cutout, flip, scale, rotate"
    with pytest.raises(ValidationError, match=rf"unknown DSA family 'blur' in strategy 'color_blur'; {valid}"):
        DSAConfig(strategy="color_blur")
    with pytest.raises(ValidationError, match="extra"):
        DSAConfig(ratio_noise=0.05)
    with pytest.raises(ValueError, match="float images"):
        dsa(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_registered_for_training():
    # in a fresh interpreter: importing distill.train alone must register "dsa"
    code = "import distill.train as t; assert 'dsa' in t.AUGMENTS, sorted(t.AUGMENTS)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "dsa" in AUGMENTS
    x, y = _images(n=12), torch.arange(3).repeat(4)
    net = create_net("convnet", num_classes=3, image_size=16, width=8, depth=2)
    result = train(net, x, y, TrainConfig(epochs=1, batch_size=4, augment="dsa"))
    assert len(result.history) == 1 and math.isfinite(result.final["loss"])

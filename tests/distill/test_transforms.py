"""Tests for distill.transforms.Preprocessor: normalization, ZCA, inverse and persistence.

Uses small real slices of CIFAR-10 from ../shared/data (override with DISTILLERY_DATA).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distill.data import DataError, load_images
from distill.transforms import MAX_ZCA_DIM, Preprocessor

DATA = Path(os.environ.get("DISTILLERY_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def cifar_dir() -> Path:
    if not (DATA / "cifar10").exists():
        pytest.skip(f"real data not found at {DATA / 'cifar10'}; set DISTILLERY_DATA to the folder holding cifar10/")
    return DATA / "cifar10"


@pytest.fixture(scope="module")
def cifar() -> torch.Tensor:
    return load_images(cifar_dir(), "test", per_class=50).images


@pytest.fixture(scope="module")
def cifar8() -> torch.Tensor:
    """8x8 images: D = 192 dimensions with 1,000 samples, so the covariance is well determined."""
    return load_images(cifar_dir(), "test", per_class=100, image_size=8).images


@pytest.fixture(scope="module")
def zca8(cifar8: torch.Tensor) -> Preprocessor:
    # Fitted once: on 2 busy cores MKL's small eigendecompositions can take seconds each.
    return Preprocessor.fit(cifar8, zca=True)


def test_normalized_train_is_standardized(cifar: torch.Tensor):
    pre = Preprocessor.fit(cifar)
    x = pre(cifar)
    assert x.dtype == torch.float32 and x.shape == cifar.shape
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert pre.config()["kind"] == "normalize" and pre.config()["image_shape"] == [3, 32, 32]


def test_zca_whitened_train_has_identity_covariance(cifar8: torch.Tensor):
    pre = Preprocessor.fit(cifar8, zca=True, zca_eps=1e-6)
    z = pre(cifar8).reshape(len(cifar8), -1).double()
    cov = torch.cov(z.T)
    assert (cov - torch.eye(cov.shape[0], dtype=torch.float64)).abs().max() < 0.02


def test_zca_matches_kornia_recipe(cifar8: torch.Tensor):
    """(x - mean) @ U diag(1/sqrt(S + eps)) U^T on normalized data, S from the unbiased covariance."""
    eps = 0.1
    pre = Preprocessor.fit(cifar8, zca=True, zca_eps=eps)
    x = Preprocessor.fit(cifar8)(cifar8).reshape(len(cifar8), -1).double()
    centered = x - x.mean(0)
    u, s, _ = torch.linalg.svd(centered.T @ centered / (len(x) - 1))
    expected = centered @ (u @ torch.diag((s + eps).rsqrt()) @ u.T)
    assert torch.allclose(pre(cifar8).reshape(len(x), -1).double(), expected, atol=1e-4)
    assert pre.config()["zca_eps"] == eps


def test_pixel_zca_whitens_0_1_pixels_as_mtt_does(cifar8: torch.Tensor):
    """zca='pixels': kornia's ZCAWhitening on x / 255 (no per-channel standardization), invertible, and
    its own preprocessing (another fingerprint than the standardized ZCA's)."""
    eps = 0.1
    pre = Preprocessor.fit(cifar8, zca="pixels", zca_eps=eps)
    x = cifar8.reshape(len(cifar8), -1).double() / 255
    centered = x - x.mean(0)
    u, s, _ = torch.linalg.svd(centered.T @ centered / (len(x) - 1))
    expected = centered @ (u @ torch.diag((s + eps).rsqrt()) @ u.T)
    assert torch.allclose(pre(cifar8).reshape(len(x), -1).double(), expected, atol=1e-4)
    assert pre.mean.tolist() == [0.0] * 3 and pre.std.tolist() == [1.0] * 3
    assert (pre.to_uint8(pre(cifar8)).int() - cifar8.int()).abs().max() <= 1
    assert pre.fingerprint() != Preprocessor.fit(cifar8, zca=True, zca_eps=eps).fingerprint()
    with pytest.raises(DataError, match="zca must be false, true or 'pixels'; got 'kornia'"):
        Preprocessor.fit(cifar8, zca="kornia")


@pytest.mark.parametrize("zca", [False, True])
def test_to_uint8_inverts(cifar8: torch.Tensor, zca8: Preprocessor, zca: bool):
    pre = zca8 if zca else Preprocessor.fit(cifar8)
    assert (pre.to_uint8(pre(cifar8)).int() - cifar8.int()).abs().max() <= 1


@pytest.mark.parametrize("zca", [False, True])
def test_save_load_round_trip_is_exact(cifar8: torch.Tensor, zca8: Preprocessor, tmp_path: Path, zca: bool):
    pre = zca8 if zca else Preprocessor.fit(cifar8)
    pre.save(tmp_path / "pre.safetensors")
    back = Preprocessor.load(tmp_path / "pre.safetensors")
    assert back.config() == pre.config()
    assert back.state_dict().keys() == pre.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in pre.state_dict().items())
    assert torch.equal(back(cifar8), pre(cifar8))
    assert back.fingerprint() == pre.fingerprint()
    rebuilt = Preprocessor.from_state(pre.config(), pre.state_dict())
    assert rebuilt.fingerprint() == pre.fingerprint()


def test_batching_does_not_change_results(cifar8: torch.Tensor, zca8: Preprocessor):
    pre = Preprocessor.fit(cifar8, zca=True, batch_size=64)
    assert torch.allclose(pre.zca, zca8.zca, atol=1e-6)
    # BLAS blocks a matmul differently per batch shape, so only float round-off may differ.
    assert torch.allclose(pre(cifar8, batch_size=7), pre(cifar8), atol=1e-5)
    assert (pre.to_uint8(pre(cifar8), batch_size=7).int() - pre.to_uint8(pre(cifar8)).int()).abs().max() <= 1


def test_standard_statistics_work_at_any_size():
    pre = Preprocessor.standard((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 5, 7).contiguous()
    x = pre(images)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-2.0, (128 / 255 - 0.5) / 0.25, 2.0]), atol=1e-6)
    expected = {"kind": "normalize", "mean": [0.5] * 3, "std": [0.25] * 3, "zca_eps": None, "image_shape": None}
    assert pre.config() == expected
    assert torch.equal(pre.to_uint8(x), images)


def test_zca_refused_above_limit():
    side = 74  # 3 * 74 * 74 = 16428 > 16384
    assert 3 * side * side > MAX_ZCA_DIM
    images = torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8)
    with pytest.raises(DataError, match=r"16428x16428 matrix.*memory.*D <= 16384"):
        Preprocessor.fit(images, zca=True)
    assert Preprocessor.fit(images).kind == "normalize"


def test_bad_inputs(cifar8: torch.Tensor, zca8: Preprocessor, tmp_path: Path):
    pre = zca8
    with pytest.raises(DataError, match=r"images are \[3, 16, 16\]; this ZCA preprocessor was fitted on \[3, 8, 8\]"):
        pre(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(DataError, match="expected uint8"):
        pre(cifar8.float())
    with pytest.raises(DataError, match="std must be positive"):
        Preprocessor.standard((0.5,), (0.0,))
    with pytest.raises(DataError, match="unknown preprocessor kind 'pca'"):
        Preprocessor.from_state({"kind": "pca"}, {})
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="not a saved preprocessor"):
        Preprocessor.load(tmp_path / "other.safetensors")


def test_nearly_constant_channels_are_refused():
    """Old behaviour: constant images passed the `std == 0` check (round-off std ~4e-8) and trained at chance."""
    import pytest

    from distill.data import DataError
    from distill.transforms import Preprocessor

    flat = torch.full((16, 3, 8, 8), 127, dtype=torch.uint8)
    flat[0, 0, 0, 0] = 128  # one pixel off by one level: a spread far below any real image's
    with pytest.raises(DataError, match="constant"):
        Preprocessor.fit(flat)


def test_data_config_takes_pixel_zca_and_names_the_choices():
    from pydantic import ValidationError

    from distill.data import DataConfig

    assert DataConfig(source="x", zca="pixels").zca == "pixels"
    assert DataConfig(source="x", zca=True).model_dump()["zca"] is True  # the keys of existing datasets hold
    with pytest.raises(ValidationError, match="'pixels'"):
        DataConfig(source="x", zca="kornia")

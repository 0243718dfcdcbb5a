"""Differentiable Siamese Augmentation (DSA) on float image batches [N, C, H, W].

DSA (Zhao & Bilen, 2021) augments images with operations that are differentiable w.r.t. the
pixels, so distillation losses can push gradients through the augmentation into synthetic
images. MTT, its successors and their evaluations train with it. This module reproduces MTT's
`ParamDiffAug`/`DiffAugment` (mtt-distillation `utils.py`, itself from data-efficient-gans),
family for family and with the same ranges:

  color   brightness + U(-0.5, 0.5), saturation x U(0, 2) around the per-pixel channel mean,
          contrast x U(0.5, 1.5) around the per-image mean
  crop    integer shift of up to 12.5% of the size (4 px at 32 px) with zero fill
  cutout  zero a square half the size of the image, centred at a random pixel
  flip    horizontal, p = 0.5
  scale   independent x/y scale U(1/1.2, 1.2) (affine_grid + bilinear grid_sample)
  rotate  U(-15, 15) degrees (affine_grid + bilinear grid_sample)

mode "single" is MTT's aug_mode 'S' (its default): each call picks one family for the whole
batch, with parameters drawn per sample. "all" (aug_mode 'M') applies every family in turn.

Unlike MTT, which draws from torch's global RNG, every random number comes from a CPU
torch.Generator and only then moves to the images' device, so a seed gives the same
augmentation on CPU and GPU. Randomness is split from application: `sample_params` draws a
`DSAParams` and `apply_params` applies it. One DSAParams can therefore be applied to a real and
a synthetic batch alike (the "Siamese" in DSA; sample with n=1 to share one parameter set over
batches of any size, like DSA's seeded batch mode), or replayed on the same batch to recompute
the same graph (TESLA-style constant-memory trajectory matching).
Everything is batched (per-sample index maps, masks and affine matrices): 256x3x32x32 takes
a few ms per family on two CPU cores.

Also here: AUGMENTS, the registry of training augmentations by name ("none", "flip_crop" (the
CIFAR recipe), "dsa"), which distill.train and every config with an `augment` field use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator

from distill.registry import Registry

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


class DSAConfig(BaseModel, frozen=True, extra="forbid"):
    """Which DSA families to apply and their ranges. Defaults: MTT's ParamDiffAug."""

    strategy: str = Field(
        "color_crop_cutout_flip_scale_rotate",
        description=(
            "DSA families to apply, joined by '_' as MTT's dsa_strategy; families: " + ", ".join(FAMILIES) + "."
        ),
    )
    # "all" is heavier and not what MTT's numbers were made with
    mode: Literal["single", "all"] = Field(
        "single",
        description=(
            "single: one family per call, drawn uniformly (MTT's default aug_mode 'S'); "
            "all: every family in strategy order (aug_mode 'M')."
        ),
    )
    brightness: float = Field(
        1.0, ge=0, description=("Brightness: additive shift U(-0.5, 0.5) x this, in (normalized/ZCA) pixel units.")
    )
    saturation: float = Field(
        2.0,
        ge=0,
        description=(
            "Saturation: factor U(0, this) around the per-pixel channel mean; 0 = grey, 1 = unchanged "
            "(2 centres it on 1)."
        ),
    )
    contrast: float = Field(
        0.5, ge=0, description=("Contrast: factor U(this, this + 1) around the image mean (0.5 centres it on 1).")
    )
    ratio_crop_pad: float = Field(
        0.125,
        ge=0,
        lt=1,
        description=("Crop: max shift as a fraction of the image size, rounded to pixels (0.125 = 4 px at 32 px)."),
    )
    ratio_cutout: float = Field(
        0.5,
        gt=0,
        le=1,
        description=("Cutout: side of the zeroed square as a fraction of the image side (0.5 = 16 px at 32 px)."),
    )
    prob_flip: float = Field(0.5, ge=0, le=1, description="Flip: chance of a horizontal flip, per sample.")
    ratio_scale: float = Field(
        1.2, ge=1, description=("Scale: x and y scale factors drawn independently from U(1/this, this).")
    )
    ratio_rotate: float = Field(15.0, ge=0, le=180, description="Rotate: max rotation in degrees, either way.")

    @field_validator("strategy")
    @classmethod
    def _known_families(cls, strategy: str) -> str:
        unknown = [name for name in strategy.split("_") if name not in FAMILIES]
        if unknown:
            raise ValueError(
                f"unknown DSA famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} "
                f"in strategy {strategy!r}; valid families: {', '.join(FAMILIES)}"
            )
        return strategy

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(self.strategy.split("_"))


@dataclass(frozen=True)
class DSAParams:
    """One draw of DSA parameters for n samples, on the CPU; n=1 applies to a batch of any size.

    Every family's parameters are present, `families` says which are applied and in what order.
    crop and cutout are stored as uniforms in [0, 1) together with their ratios and turned into
    pixels when applied, so one draw fits images of any size.
    """

    families: tuple[str, ...]
    brightness: torch.Tensor  # [n] additive shift
    saturation: torch.Tensor  # [n] factor around the per-pixel mean over channels
    contrast: torch.Tensor  # [n] factor around the per-image mean
    crop: torch.Tensor  # [n, 2] (row, col) uniforms picking a shift in [-s, s], s = round(ratio_crop_pad * size)
    ratio_crop_pad: float
    cutout: torch.Tensor  # [n, 2] (row, col) uniforms picking the square's centre
    ratio_cutout: float
    flip: torch.Tensor  # [n] bool
    scale: torch.Tensor  # [n, 2] (x, y) factors
    rotate: torch.Tensor  # [n] radians, counter-clockwise

    @property
    def n(self) -> int:
        return self.flip.shape[0]

    def to(self, device: torch.device | str) -> DSAParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in values.items() if isinstance(v, torch.Tensor)})


def sample_params(n: int, cfg: DSAConfig = DSAConfig(), generator: torch.Generator | None = None) -> DSAParams:
    """Draw DSA parameters for n samples from `generator` (None: torch's global CPU generator).

    All families are drawn even when one is applied, so every call consumes the same amount of
    the generator and what follows it does not depend on which family was chosen.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got {n}")
    families = cfg.families
    if cfg.mode == "single":
        families = (families[int(torch.randint(len(families), (1,), generator=generator))],)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=generator)

    low_scale = 1.0 / cfg.ratio_scale
    return DSAParams(
        families=families,
        brightness=(uniform() - 0.5) * cfg.brightness,
        saturation=uniform() * cfg.saturation,
        contrast=uniform() + cfg.contrast,
        crop=uniform(2),
        ratio_crop_pad=cfg.ratio_crop_pad,
        cutout=uniform(2),
        ratio_cutout=cfg.ratio_cutout,
        flip=uniform() < cfg.prob_flip,
        scale=uniform(2) * (cfg.ratio_scale - low_scale) + low_scale,
        rotate=(uniform() * 2 - 1) * math.radians(cfg.ratio_rotate),
    )


def _uniform_int(u: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) -> integers uniform over 0..count-1 (float32 u * count stays below count)."""
    return (u * count).long()


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1] in x's dtype, ready to broadcast over a batch (n = 1 or N)."""
    return t.to(x.dtype).view(-1, 1, 1, 1)


def _color(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    x = x + _per_sample(p.brightness, x)
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * _per_sample(p.saturation, x) + gray
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_sample(p.contrast, x) + mean


def _crop(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    # One gather over the flattened images: each output pixel reads its shifted source, and a
    # mask zeroes those whose source falls outside (MTT's 1-px zero pad with clamped indices).
    n, c, h, w = x.shape
    max_shift = torch.tensor([int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)], device=x.device)
    shift = _uniform_int(p.crop, 2 * max_shift + 1) - max_shift  # [n, 2], uniform over -s..s
    rows = torch.arange(h, device=x.device) + shift[:, :1]  # [n, H]
    cols = torch.arange(w, device=x.device) + shift[:, 1:]  # [n, W]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
    index = index.view(-1, 1, h * w).expand(n, c, -1)
    out = x.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return out * inside[:, None].to(x.dtype)


def _cutout(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    _, _, h, w = x.shape
    cut_h, cut_w = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    # Centres range over 0..size (0..size-1 for odd squares) as in MTT, so squares near the
    # border are clipped and on average ~19% of a 32 px image is zeroed, not 25%.
    centre = _uniform_int(p.cutout, torch.tensor([h + 1 - cut_h % 2, w + 1 - cut_w % 2], device=x.device))
    top, left = centre[:, :1] - cut_h // 2, centre[:, 1:] - cut_w // 2
    rows = torch.arange(h, device=x.device) - top  # [n, H], inside the square where in [0, cut_h)
    cols = torch.arange(w, device=x.device) - left
    cut = ((rows >= 0) & (rows < cut_h))[:, :, None] & ((cols >= 0) & (cols < cut_w))[:, None, :]
    return x * (~cut)[:, None].to(x.dtype)


def _flip(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    return torch.where(p.flip.view(-1, 1, 1, 1), x.flip(3), x)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling by per-sample 2x3 affine maps, align_corners=True as in MTT."""
    theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    sx, sy = p.scale.unbind(1)
    zero = torch.zeros_like(sx)
    return _warp(x, torch.stack([sx, zero, zero, zero, sy, zero], 1).view(-1, 2, 3))


def _rotate(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    cos, sin, zero = p.rotate.cos(), p.rotate.sin(), torch.zeros_like(p.rotate)
    return _warp(x, torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(-1, 2, 3))


_APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def apply_params(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    """Apply a drawn DSAParams to x [N, C, H, W]; deterministic and differentiable w.r.t. x."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"DSA needs float images [N, C, H, W]; got {x.dtype} {tuple(x.shape)}")
    if params.n not in (1, x.shape[0]):
        raise ValueError(f"DSAParams drawn for {params.n} samples cannot augment a batch of {x.shape[0]}")
    params = params.to(x.device)
    for family in params.families:
        x = _APPLY[family](x, params)
    return x.contiguous()


def dsa(
    x: torch.Tensor,
    cfg: DSAConfig = DSAConfig(),
    *,
    generator: torch.Generator | None = None,
    params: DSAParams | None = None,
) -> torch.Tensor:
    """Augment x [N, C, H, W] with DSA: fresh parameters from `generator`, or replay `params`.

    With `params`, cfg is unused: a DSAParams carries everything it needs.
    """
    if params is None:
        params = sample_params(x.shape[0], cfg, generator)
    return apply_params(x, params)


# ---------------------------------------------------------------- training augmentations by name

# name -> fn(x [N,C,H,W], generator) -> augmented x. The generator is a CPU torch.Generator:
# draw random parameters on it and move them to x.device, so a seed gives the same
# augmentation on every device. Augmentations should stay differentiable w.r.t. x, because
# distillation methods (DSA) push gradients through them to the synthetic images.
AUGMENTS: Registry[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = Registry("augment")
register_augment = AUGMENTS.register  # decorator: @register_augment("name")
AugmentName = AUGMENTS.name_type()  # a config field holding a registered augmentation name


@register_augment("none")
def no_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


@register_augment("flip_crop")
def flip_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding by 1/8 of the size (4 px at 32 px).

    One gather per batch: flip and shift become per-sample index maps into the padded images.
    """
    n, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    cols = torch.arange(w)
    # Reading columns right-to-left from a uniformly shifted window is a flip followed by a crop.
    cols = dx + torch.where(flip, w - 1 - cols, cols)
    rows = dy + torch.arange(h)
    batch = torch.arange(n)[:, None, None]
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    out = padded[batch.to(dev), :, rows[:, :, None].to(dev), cols[:, None, :].to(dev)]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


@register_augment("dsa")
def dsa_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MTT's training augmentation (DSAConfig defaults) for distill.train."""
    return dsa(x, generator=generator)

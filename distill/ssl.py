"""Self-supervised teacher for KRR-ST: Barlow Twins on an unlabelled source.

KRR-ST distills the representations of a self-supervised teacher; its reference repository
(`db-Lee/selfsup_dd`) downloads a Barlow Twins ResNet-18 and has no code to train one,
so this module trains it:

  two views   each image is augmented twice, independently (DSA families applied all in turn:
              colour, crop, flip, scale by default; batched and seeded, distill.augment)
  projector   backbone.embed -> [Linear -> BatchNorm1d -> ReLU] * (k-1) -> Linear (Zbontar et al.)
  loss        C = z1n^T z2n / N, the cross-correlation of the batch-standardized projections;
              sum_i (1 - C_ii)^2 + off_diagonal_weight * sum_{i != j} C_ij^2

The teacher's representation is `backbone.embed(x)` (the projector is thrown away, as in Barlow
Twins). Inputs are in the model input space of distill.transforms.Preprocessor (normalized
floats), the same space KRR-ST's synthetic images live in.

Training is resumable: after every epoch the backbone, projector, optimizer and generator state
go to `<out_dir>/ckpt/` (a distill.checkpoint commit); a restarted run with the same
config continues from the last epoch and ends bit-identical to an uninterrupted one. The
result is `<out_dir>/teacher.safetensors`: the backbone's weights, with the net, its arguments
and the config in the safetensors metadata, so `load_teacher` rebuilds it anywhere.
Pure: imports neither prefect nor ray.

    python -c "from distill.ssl import SSLConfig; print(SSLConfig())"
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from pydantic import Field

from distill.augment import DSAConfig, dsa
from distill.checkpoint import (
    Checkpoint,
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
)
from distill.fsio import atomic_file
from distill.nets import NetFields, NetName, create_net
from distill.train import check_finite_losses
from distill.utils import Progress, derive_seed, resolve_device

TEACHER_FILE = "teacher.safetensors"
TEACHER_FORMAT = "distillery.ssl-teacher/1"


class SSLConfig(NetFields, frozen=True, extra="forbid"):
    """How the Barlow Twins teacher is trained. Defaults: a CPU-sized teacher."""

    net: NetName = Field(
        "convnet_bn", description=("Teacher backbone (a distill.nets name); the paper's teacher is resnet18 (512-d).")
    )
    net_kwargs: dict[str, Any] = Field(
        {"widths": [32, 64, 128, 256]},
        description=(
            "Options of the backbone; convnet_bn at 32 px with 4 blocks gives a 2x2x256 map, "
            "i.e. 1024-d representations."
        ),
    )
    projector: list[int] = Field(
        default_factory=lambda: [1024, 1024],
        min_length=1,
        description=("Projector layer sizes, the last one being the output dim (Barlow Twins uses 8192 x 3)."),
    )
    off_diagonal_weight: float = Field(
        5e-3,
        ge=0,
        description=(
            "Weight (lambda) of the off-diagonal term of the Barlow Twins loss; the paper uses 5e-3 "
            "with an 8192-d projector."
        ),
    )
    epochs: int = Field(20, ge=1, description="Full passes over the source images.")
    batch_size: int = Field(
        256, ge=2, description=("Images per step, two views each; at least 2, as the loss needs batch correlations.")
    )
    # AdamW rather than Barlow Twins' LARS, which is for batch 2048 on GPUs
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate, cosine-decayed to 0.")
    weight_decay: float = Field(
        1e-5,
        ge=0,
        description=("AdamW weight decay (Barlow Twins uses 1.5e-6 with LARS; a little more for small data)."),
    )
    # cutout and rotate are left out as Barlow Twins' views are crops, flips and colour changes
    augment: DSAConfig = Field(
        DSAConfig(strategy="color_crop_flip_scale", mode="all"),
        description=("Augmentation making the two views: every family in turn (mode all), per-sample parameters."),
    )
    seed: int = Field(0, description="Seed of the init, the batch order and the views.")


# ---------------------------------------------------------------- the loss


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float, eps: float = 1e-5
) -> torch.Tensor:
    """Barlow Twins loss of two views' projections [N, D] (standardized over the batch, as BN1d without affine)."""
    if z1.shape != z2.shape or z1.dim() != 2 or z1.shape[0] < 2:
        raise ValueError(f"need two [N>=2, D] projections of one shape; got {tuple(z1.shape)} and {tuple(z2.shape)}")

    def standardize(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)

    c = standardize(z1).T @ standardize(z2) / z1.shape[0]
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + off_diagonal_weight * off


class Projector(nn.Module):
    """[Linear -> BN1d -> ReLU] for every hidden size, then a bias-free Linear (Barlow Twins)."""

    def __init__(self, in_dim: int, sizes: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for size in sizes[:-1]:
            layers += [nn.Linear(in_dim, size, bias=False), nn.BatchNorm1d(size), nn.ReLU()]
            in_dim = size
        layers.append(nn.Linear(in_dim, sizes[-1], bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------- teacher training


def _build(cfg: SSLConfig, channels: int, image_size: int) -> tuple[nn.Module, Projector]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "ssl-init"))
        backbone = create_net(cfg.net, num_classes=1, channels=channels, image_size=image_size, **cfg.net_kwargs)
        projector = Projector(backbone.feature_dim, list(cfg.projector))
    return backbone, projector


def _teacher_metadata(
    cfg: SSLConfig, backbone: nn.Module, channels: int, image_size: int, extra: dict
) -> dict[str, str]:
    meta = {
        "format": TEACHER_FORMAT,
        "net": cfg.net,
        "net_kwargs": cfg.net_kwargs,
        "channels": channels,
        "image_size": image_size,
        "feature_dim": backbone.feature_dim,
        "config": cfg.model_dump(mode="json"),
        **extra,
    }
    return {"distillery": json.dumps(meta, sort_keys=True)}


def train_teacher(
    cfg: SSLConfig,
    images: torch.Tensor,
    *,
    out_dir: str | Path,
    dataset_fingerprint: str = "",
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a Barlow Twins teacher on float images [N, C, H, W] (model input space); write teacher.safetensors.

    Resumes from `<out_dir>/ckpt` when present; returns at once when the teacher exists.
    progress(epoch, epochs, loss=...) after every saved epoch. Returns {"path", "feature_dim",
    "epochs", "loss", "history", "seconds", "resumed_from", "reused", "fingerprint"}.
    """
    start = time.perf_counter()
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"teacher training needs float images [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"Barlow Twins needs at least 2 images (batch correlations); got {images.shape[0]}")
    out_dir = Path(out_dir)
    channels, image_size = images.shape[1], images.shape[-1]
    identity = {
        "config": cfg.model_dump(mode="json"),
        "dataset": dataset_fingerprint,
        "n": images.shape[0],
        "shape": list(images.shape[1:]),
    }
    final = out_dir / TEACHER_FILE
    if final.exists():
        meta = teacher_metadata(final)
        if meta.get("identity") != json.loads(json.dumps(identity)):
            raise ValueError(f"{final} holds a teacher of another configuration or dataset; delete it")
        return {
            "path": str(final),
            "feature_dim": meta["feature_dim"],
            "epochs": cfg.epochs,
            "loss": meta["loss"],
            "history": meta["history"],
            "seconds": time.perf_counter() - start,
            "resumed_from": None,
            "reused": True,
            "fingerprint": teacher_fingerprint(final),
        }

    dev = resolve_device(device)
    backbone, projector = _build(cfg, channels, image_size)
    model = nn.ModuleDict({"backbone": backbone, "projector": projector}).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "ssl-data"))
    n = images.shape[0]
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # drop the ragged last batch: tiny batches make noisy correlations
    total = cfg.epochs * steps_per_epoch
    checkpoint = Checkpoint(out_dir / "ckpt", identity, kind="ssl-teacher")
    history: list[dict] = []
    first_epoch = 1
    saved = checkpoint.load()
    resumed_from = None
    if saved is not None:
        load_module_tensors("model", model, saved.tensors)
        load_optimizer_tensors("optim", optimizer, saved.tensors, saved.record["optimizer"])
        generator.set_state(saved.tensors["rng"])
        history, resumed_from = saved.record["history"], saved.step
        first_epoch = resumed_from + 1

    x = images.to(dev, torch.float32)
    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator).to(dev)
        losses = []
        for s in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + s
            for group in optimizer.param_groups:  # a function of the step only, so a resumed run agrees
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            xb = x[order[s * batch : (s + 1) * batch]]
            v1, v2 = dsa(xb, cfg.augment, generator=generator), dsa(xb, cfg.augment, generator=generator)
            z1, z2 = projector(backbone.embed(v1)), projector(backbone.embed(v2))
            loss = barlow_twins_loss(z1, z2, cfg.off_diagonal_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        losses_t = torch.stack(losses)
        check_finite_losses(losses_t, f"Barlow Twins epoch {epoch}/{cfg.epochs}", f"lr={cfg.lr}")
        history.append({"epoch": epoch, "loss": losses_t.mean().item()})
        tensors = module_tensors("model", model)
        optim_tensors, optim_rest = optimizer_tensors("optim", optimizer)
        checkpoint.save(
            epoch,
            {**tensors, **optim_tensors, "rng": generator.get_state()},
            {"optimizer": optim_rest, "history": history},
        )
        if progress is not None:
            progress(epoch, cfg.epochs, loss=history[-1]["loss"])

    backbone.cpu().eval()
    extra = {"identity": identity, "loss": history[-1]["loss"], "history": history}
    with atomic_file(final) as f:
        f.write(
            safetensors.torch.save(
                {k: v.contiguous() for k, v in backbone.state_dict().items()},
                metadata=_teacher_metadata(cfg, backbone, channels, image_size, extra),
            )
        )
    checkpoint.remove()
    return {
        "path": str(final),
        "feature_dim": backbone.feature_dim,
        "epochs": cfg.epochs,
        "loss": history[-1]["loss"],
        "history": history,
        "seconds": time.perf_counter() - start,
        "resumed_from": resumed_from,
        "reused": False,
        "fingerprint": teacher_fingerprint(final),
    }


def teacher_metadata(path: str | Path) -> dict:
    """The `distillery` metadata of a teacher file (net, net_kwargs, feature_dim, config, history)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("distillery", "{}"))
    if meta.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path}: not a distillery teacher ({TEACHER_FORMAT}); got format {meta.get('format')!r}")
    return meta


def load_teacher(path: str | Path) -> nn.Module:
    """Rebuild a teacher backbone from teacher.safetensors, in eval mode; its representation is `.embed(x)`."""
    meta = teacher_metadata(path)
    net = create_net(
        meta["net"], num_classes=1, channels=meta["channels"], image_size=meta["image_size"], **meta["net_kwargs"]
    )
    net.load_state_dict(safetensors.torch.load_file(str(path)))
    return net.eval()


def teacher_fingerprint(path: str | Path) -> str:
    """sha256 (16 hex) of the teacher file: names the teacher in distilled sets' provenance."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

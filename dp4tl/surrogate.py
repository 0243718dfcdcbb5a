"""The DP4TL surrogate: a small net trained once on the *full* source, then used to score source classes.

DP4TL ("Selectivity Drives Productivity", Zhang et al., NeurIPS 2023) trains a ResNet-18 on all
of ImageNet and reuses it to prune the source for larger models: label mapping reads its
1000-way logits on the target, feature mapping its penultimate features. Its value comes from
being cheap relative to the models pretrained on the pruned source. The CPU-scale stand-in
here is a ConvNet w32 d3 trained a few epochs on a many-class 32 px source.

Weights are stored as safetensors (never pickle) with the config and caller metadata in the
header; `surrogate_fingerprint` identifies the exact weights a selection was computed with and is
recorded next to every selection (dp4tl.formats).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from pydantic import Field

from distill.formats import FormatError
from distill.fsio import read_bytes, write_bytes
from distill.nets import NetFields, NetName, create_net
from distill.train import TrainConfig, train
from distill.utils import Progress

SURROGATE_FORMAT = "distillery.surrogate/1"


class SurrogateConfig(NetFields, frozen=True, extra="forbid"):
    """How to train the surrogate. Defaults: a CPU-scale recipe (about a minute per 10k images)."""

    net: NetName = Field(
        "convnet",
        description=(
            "Surrogate net (a distill.nets name); DP4TL uses torchvision's ResNet-18 (resnet18 here is "
            "the CIFAR variant)."
        ),
    )
    net_kwargs: dict[str, Any] = Field(
        {"width": 32, "depth": 3},
        description=("Options of the surrogate net; the default is a CPU-scale ConvNet (width 32, depth 3)."),
    )
    # DP4TL: 16 epochs, SGD momentum 0.9, wd 5e-5, lr 0.5 per 1024 images with a cyclic schedule
    # (OPTML-Group/DP4TL). Here: 5 epochs (a few give a usable surrogate at this scale), lr 0.1 per
    # 256 images (the paper's lr scaled linearly, rounded down), cosine instead of the triangle.
    train: TrainConfig = Field(
        TrainConfig(
            epochs=5, batch_size=256, lr=0.1, momentum=0.9, weight_decay=5e-5, schedule="cosine", augment="flip_crop"
        ),
        description="How the surrogate is trained on the full labelled source.",
    )
    seed: int = Field(0, description="Seed of the weight init and the training batches and augmentation.")


def _build(cfg: SurrogateConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    # Init from cfg.seed alone, without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return create_net(cfg.net, num_classes=num_classes, channels=channels, image_size=image_size, **cfg.net_kwargs)


def train_surrogate(
    cfg: SurrogateConfig,
    source_x: torch.Tensor,
    source_y: torch.Tensor,
    num_classes: int,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """Train a surrogate on the full source: x float [N, C, S, S] (preprocessed), y int64 [N] in [0, num_classes).

    Returns the trained net in eval mode, on the device it trained on.
    """
    if source_x.ndim != 4 or source_x.shape[-1] != source_x.shape[-2]:
        raise ValueError(f"source_x must be square images [N, C, S, S]; got {list(source_x.shape)}")
    if len(source_y) and (int(source_y.min()) < 0 or int(source_y.max()) >= num_classes):
        raise ValueError(
            f"source labels must lie in [0, {num_classes}); got range [{int(source_y.min())}, {int(source_y.max())}]"
        )
    net = _build(cfg, num_classes, source_x.shape[1], source_x.shape[-1])
    train(net, source_x, source_y, cfg.train, device=device, seed=cfg.seed, progress=progress)
    return net.eval()


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}


def surrogate_fingerprint(net: nn.Module) -> str:
    """Short sha256 of the state dict: names, dtypes, shapes and bytes of every tensor, in order."""
    h = hashlib.sha256()
    for name, tensor in _cpu_state(net).items():
        h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        # Viewing the bytes as uint8 works for every dtype, bfloat16 included (numpy has none).
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def save_surrogate(net: nn.Module, path: str, meta: dict | None = None) -> str:
    """Write the weights as safetensors with `meta` (JSON-able) and the fingerprint in the header; returns it."""
    fingerprint = surrogate_fingerprint(net)
    header = {"format": SURROGATE_FORMAT, "fingerprint": fingerprint, "meta": json.dumps(meta or {})}
    write_bytes(None, path, safetensors.torch.save(_cpu_state(net), metadata=header))
    return fingerprint


def load_surrogate(path: str, cfg: SurrogateConfig, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """Rebuild the net of `cfg` and load the weights of `path`; eval mode, CPU.

    Refuses weights whose classifier head does not have `num_classes` outputs: label mapping
    would otherwise vote over the wrong class ids without any other symptom.
    """
    try:
        state = safetensors.torch.load(read_bytes(None, path))
    except FileNotFoundError as e:
        raise FormatError(f"{path}: no such file") from e
    except (OSError, safetensors.SafetensorError) as e:
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from e
    head = state.get("classifier.weight")
    if head is None:
        raise FormatError(f"{path}: no `classifier.weight`; not a distill.nets surrogate")
    if head.shape[0] != num_classes:
        raise ValueError(
            f"{path}: the surrogate's classifier head has {head.shape[0]} classes, "
            f"but the source has {num_classes}; was it trained on another source?"
        )
    net = _build(cfg, num_classes, channels, image_size)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise FormatError(f"{path}: weights do not fit net {cfg.net!r} {cfg.net_kwargs} ({e})") from e
    return net.eval()

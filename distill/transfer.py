"""One transfer recipe: pretrain a backbone on some data, then judge it on a labelled target.

Every question of the form "how good is this data (a pruned source, a distilled set, a random
subset) for pretraining?" is answered here, with one config and one set of defaults:
DP4TL's pretraining on pruned sources (tasks.transfer), KRR-ST's comparison with its
baselines (distill.krr), `python -m distill.train_on` and the pipeline.

  pretrain       a fresh backbone (cfg.net) trained with cfg.pretrain on (images, y):
                 "ce" on integer labels (a labelled source: DP4TL keeps one head output per
                 source class, pruned or not), "mse" on representation targets (KRR-ST), or
                 "none": the fresh backbone itself (the no-pretraining arm).
  linear_probe   backbone frozen (eval mode, never modified): its features on the target,
                 standardized with the target train split's mean and std, and a fresh linear
                 head trained on them with cfg.linear_probe.
  fine_tune      a copy of the backbone with a fresh linear head, all weights trained with
                 cfg.fine_tune (the backbone passed in is left as it was).
  transfer       the cfg.modes of the two above: one row {mode}_acc, {mode}_train_acc,
                 {mode}_seconds (final-epoch test accuracy, never the best epoch).

Pure PyTorch; the task layer only loads artifacts and publishes rows.

    python -c "from distill.transfer import TransferConfig; print(TransferConfig().model_dump_json(indent=1))"
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field

from distill.checkpoint import Checkpoint
from distill.nets import NetFields, NetName, create_net
from distill.train import TrainConfig, TrainResult, extract_features, train
from distill.utils import Progress, resolve_device, tensor_digest

Mode = Literal["linear_probe", "fine_tune"]
PretrainLoss = Literal["ce", "mse", "none"]
MODES: tuple[Mode, ...] = ("linear_probe", "fine_tune")


def _pretrain_default() -> TrainConfig:
    # Pretraining on a real labelled source (DP4TL: SGD, momentum 0.9, decaying lr, crop + flip).
    # A few CPU epochs are far from convergence, so the number of SGD steps decides: batch 64 at
    # lr 0.05 gave 2.6 more linear-probe points on CIFAR-10 than batch 128 for the same images and
    # CPU time (Tiny-ImageNet 30k x 4 epochs; lr 0.1 was worse); benchmarks/records/transfer_regime.jsonl.
    # wd 5e-4 rather than DP4TL's 5e-5: a short, small-data run, where the CIFAR recipe's wd is
    # the usual choice. Epochs are a source-size decision for each preset (the prune-eval cpu
    # preset: 4 epochs of 30k images); distilled sets of ~100 images need ~1000 (distill.krr).
    return TrainConfig(
        epochs=4,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        loss="ce",
        augment="flip_crop",
    )


def _probe_default() -> TrainConfig:
    # A linear head on standardized, frozen features: Adam, 100 epochs, batch 128, cosine, no
    # augmentation. DP4TL's lp recipe is Adam 0.01 x 50 epochs at batch 128; on a scarce-label
    # target (a few hundred images, 2 steps per epoch) the head overfits within a few epochs, and
    # lr 1e-3 x 100 epochs was ~1 point better than 0.01 x 50 or 100 and KRR-ST's SGD 0.2 x 100
    # at batch 512, for pretrained and random backbones alike (CIFAR-10, 20 per class, this CPU).
    # Standardizing the features makes one lr fit every backbone (instance- or batch-norm
    # ConvNets, a random init, a self-supervised teacher), whose feature scales differ by
    # orders of magnitude; it changed the instance-norm ConvNet's probe by < 1 point.
    return TrainConfig(
        epochs=100, batch_size=128, lr=1e-3, optimizer="adam", weight_decay=0.0, schedule="cosine", augment="none"
    )


def _finetune_default() -> TrainConfig:
    # KRR-ST's fine-tuning recipe (SGD 0.01, momentum 0.9, wd 5e-4, cosine, crop + flip) at
    # batch 64 instead of 256 and for 30 epochs: with 10-50 labelled images per class a batch
    # of 256 is 1-2 steps per epoch. Measured on CIFAR-10 at 20 per class: better than DP4TL's
    # Adam (1e-3 here; 1e-4 in the paper) by 1-2 points, and 60 epochs helped the random init
    # more than the pretrained net (the target, not the source, then decides).
    return TrainConfig(
        epochs=30, batch_size=64, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine", augment="flip_crop"
    )


class TransferConfig(NetFields, frozen=True, extra="forbid"):
    """How a backbone is pretrained and judged: the one transfer recipe of the project."""

    net: NetName = Field(
        "convnet", description=("The backbone that is pretrained and transferred (a distill.nets name).")
    )
    net_kwargs: dict[str, Any] = Field(
        {"width": 32, "depth": 3},
        description=("Options of the backbone; the default is the CPU-scale ConvNet (DP4TL uses ResNet-18/50)."),
    )
    pretrain: TrainConfig = Field(
        default_factory=_pretrain_default,
        description=("Pretraining recipe on the source (its loss, ce or mse, is set per call by the method)."),
    )
    linear_probe: TrainConfig = Field(
        default_factory=_probe_default,
        description=(
            "Linear probe: a fresh linear head trained on the frozen backbone's standardized target features."
        ),
    )
    fine_tune: TrainConfig = Field(
        default_factory=_finetune_default,
        description=("Fine-tuning: the backbone plus a fresh linear head, all weights trained on the target."),
    )
    modes: list[Mode] = Field(
        default_factory=lambda: list(MODES),
        min_length=1,
        description=("Which judgements run: linear_probe, fine_tune or both."),
    )

    def pretraining(self) -> dict[str, Any]:
        """What a pretrained net depends on (net and pretraining recipe, not how it is judged): a cache
        key part, so a new probe or fine-tune recipe reuses the pretrained weights."""
        return self.model_dump(mode="json", include={"net", "net_kwargs", "pretrain"})

    def judging(self) -> dict[str, Any]:
        """How a backbone is judged (probe, fine-tune, modes): the rest of a transfer's cache key."""
        return self.model_dump(mode="json", include={"linear_probe", "fine_tune", "modes"})


def backbone(cfg: TransferConfig, image_shape: tuple[int, ...] | list[int], out_dim: int, seed: int) -> nn.Module:
    """A fresh cfg.net for [C, H, W] inputs with `out_dim` outputs; its init depends on `seed` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_net(
            cfg.net,
            num_classes=out_dim,
            channels=int(image_shape[0]),
            image_size=int(image_shape[-1]),
            **cfg.net_kwargs,
        )


def _out_dim(loss: PretrainLoss, y: torch.Tensor | None, out_dim: int | None) -> int:
    if loss == "none":
        return out_dim or 1
    if y is None:
        raise ValueError(f"pretraining with loss {loss!r} needs {'labels' if loss == 'ce' else 'targets'}")
    if loss == "mse":
        if y.dim() != 2 or not y.is_floating_point():
            raise ValueError(f"loss 'mse' needs float targets [N, D]; got {y.dtype} {tuple(y.shape)}")
        if out_dim is not None and out_dim != y.shape[1]:
            raise ValueError(f"out_dim={out_dim} but the targets have {y.shape[1]} dimensions")
        return int(y.shape[1])
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"loss 'ce' needs integer labels [N]; got {y.dtype} {tuple(y.shape)}")
    needed = int(y.max()) + 1 if y.numel() else 1
    if out_dim is not None and out_dim < needed:
        raise ValueError(f"out_dim={out_dim} but the labels go up to {needed - 1}")
    return out_dim or needed


def pretrain(
    cfg: TransferConfig,
    images: torch.Tensor | None,
    y: torch.Tensor | None,
    *,
    loss: PretrainLoss,
    image_shape: tuple[int, ...] | list[int] | None = None,
    out_dim: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    work_dir: str | Path | None = None,
    checkpoint_every: int = 1,
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh backbone pretrained on (images, y) with cfg.pretrain and `loss`; returns (net, info).

    work_dir: where the run commits a checkpoint every `checkpoint_every` epochs (distill.checkpoint);
    restarted with the same arguments, it resumes there and ends bit-identical to an uninterrupted run.

    ce: y int labels [N], the head has `out_dim` outputs (default max label + 1; DP4TL passes
    the source's class count so pruned sources keep every class). mse: y float targets [N, D].
    none: the fresh backbone, untrained (images and y are not read; give image_shape).
    info: pretrain_seconds, train_images, images_seen (+ pretrain_loss, pretrain_train_acc
    when trained).
    """
    shape = list(images.shape[1:]) if images is not None else image_shape
    if shape is None:
        raise ValueError("give the images, or image_shape for loss 'none'")
    dim = _out_dim(loss, y, out_dim)
    net = backbone(cfg, shape, dim, seed)
    if loss == "none":
        return net, {"pretrain_seconds": 0.0, "train_images": 0, "images_seen": 0}
    if images is None or len(images) == 0:
        raise ValueError(f"pretraining with loss {loss!r} needs images")
    recipe = cfg.pretrain.model_copy(update={"loss": loss})
    checkpoint = None
    if work_dir is not None:
        identity = {
            "pretraining": cfg.pretraining(),
            "loss": loss,
            "out_dim": dim,
            "seed": seed,
            "data": tensor_digest(images, y),
        }
        checkpoint = Checkpoint(Path(work_dir) / "pretrain-ckpt", identity, kind="pretrain")
    result: TrainResult = train(
        net,
        images,
        y,
        recipe,
        device=device,
        seed=seed,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    return net, {
        "pretrain_seconds": result.seconds,
        "pretrain_loss": result.final["loss"],
        "pretrain_train_acc": result.final["train_acc"],
        "train_images": int(len(images)),
        "images_seen": int(len(images)) * cfg.pretrain.epochs,
    }


def _fresh_head(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


def _summary(result: TrainResult, start: float) -> dict[str, Any]:
    return {
        "test_acc": result.final["test_acc"],
        "train_acc": result.final["train_acc"],
        "train_loss": result.final["loss"],
        "seconds": time.perf_counter() - start,
    }


def linear_probe(
    net: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: TrainConfig,
    *,
    num_classes: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Linear, dict[str, Any]]:
    """A fresh linear head on the frozen, standardized features of `net`; returns (head, summary).

    `net` is only read (eval mode, no gradients). The head takes standardized features: the
    mean and std come from the train split alone. cfg.augment is ignored (fixed features).
    """
    dev = resolve_device(device)
    start = time.perf_counter()
    train_f, test_f = extract_features(net, train_x, device=dev), extract_features(net, test_x, device=dev)
    mean, std = train_f.mean(0), train_f.std(0, unbiased=False).clamp_min(1e-6)
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    head = _fresh_head(train_f.shape[1], num_classes, seed)
    result = train(
        head,
        train_f,
        train_y,
        cfg.model_copy(update={"augment": "none"}),
        device=dev,
        seed=seed,
        eval_data=(test_f, test_y),
        progress=progress,
    )
    return head, _summary(result, start)


def fine_tune(
    net: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: TrainConfig,
    *,
    num_classes: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of `net` with a fresh Linear(feature_dim, num_classes) head, all weights trained.

    Returns (tuned copy, summary); `net` itself is not modified, so one pretrained backbone
    serves many targets and seeds.
    """
    start = time.perf_counter()
    tuned = copy.deepcopy(net)
    tuned.classifier = _fresh_head(tuned.feature_dim, num_classes, seed)
    result = train(
        tuned, train_x, train_y, cfg, device=device, seed=seed, eval_data=(test_x, test_y), progress=progress
    )
    return tuned, _summary(result, start)


JUDGES: dict[Mode, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {
    "linear_probe": linear_probe,
    "fine_tune": fine_tune,
}


def transfer(
    net: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: TransferConfig,
    *,
    num_classes: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[Mode], Progress | None] | None = None,
) -> dict[str, Any]:
    """Judge `net` on a labelled target by every mode in cfg.modes; one flat row of final-epoch numbers.

    Keys per mode: {mode}_acc (test), {mode}_train_acc, {mode}_seconds. progress(mode) may
    return a per-mode progress callback.
    """
    if len(train_y) == 0 or len(test_y) == 0:
        raise ValueError(f"the target needs train and test images; got {len(train_y)} train, {len(test_y)} test")
    row: dict[str, Any] = {}
    for mode in cfg.modes:
        _, r = JUDGES[mode](
            net,
            train_x,
            train_y,
            test_x,
            test_y,
            getattr(cfg, mode),
            num_classes=num_classes,
            seed=seed,
            device=device,
            progress=progress(mode) if progress else None,
        )
        row.update(
            {
                f"{mode}_acc": r["test_acc"],
                f"{mode}_train_acc": r["train_acc"],
                f"{mode}_seconds": round(r["seconds"], 3),
            }
        )
    return row

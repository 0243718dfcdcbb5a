"""Supervised training and evaluation loops: plain training, evaluation, feature extraction.

One loop serves every stage that trains a net on in-memory tensors: expert training, evaluating
a distilled set (MTT/DC recipe: SGD 0.01, momentum 0.9, wd 5e-4, batch 256, lr x0.1 at half),
KRR-ST pretraining (MSE to representations) and transfer (distill.transfer's linear probe and
fine-tune train through it).
Data lives on the device for the whole run (no DataLoader), and all randomness (shuffling,
augmentation) comes from one CPU torch.Generator seeded by `seed`, so a run is reproducible and
gives the same batches on CPU and GPU. Reported numbers are final-epoch numbers, never the max
over evaluations (the test set is not a validation set).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator

from distill.allocator import keep_freed_memory
from distill.augment import AUGMENTS, AugmentName
from distill.checkpoint import (
    Checkpoint,
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
)
from distill.registry import Registry
from distill.utils import Progress, peak_memory_mb, resolve_device


def _sgd(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _adam(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry(
    "optimizer", {"sgd": _sgd, "adam": _adam, "adamw": _adamw}
)

# lr multiplier as a function of the fraction of training done, t in [0, 1).
SCHEDULES: Registry[Callable[[float], float]] = Registry(
    "schedule",
    {
        "step": lambda t: 0.1 if t >= 0.5 else 1.0,
        "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
        "constant": lambda t: 1.0,
    },
)

LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = Registry(
    "loss",
    {
        "ce": lambda out, y, smoothing: F.cross_entropy(out, y, label_smoothing=smoothing),
        "soft_ce": lambda out, y, smoothing: F.cross_entropy(out, y, label_smoothing=smoothing),
        "mse": lambda out, y, smoothing: F.mse_loss(out, y),
    },
)

OptimizerName, ScheduleName, LossName = OPTIMIZERS.name_type(), SCHEDULES.name_type(), LOSSES.name_type()


class TrainConfig(BaseModel, frozen=True, extra="forbid"):
    """How to train one net on in-memory tensors. Defaults: the MTT/DC evaluation recipe."""

    epochs: int = Field(
        300,
        ge=1,
        description=(
            "Full passes over the training images. DC/DM evaluate distilled sets with 300, "
            "MTT (Dataset Distillation by Matching Training Trajectories) with 1000."
        ),
    )
    batch_size: int = Field(
        256,
        ge=1,
        description=(
            "Images per optimizer step; clipped to the number of images, so a 10-image set trains full-batch."
        ),
    )
    lr: float = Field(
        0.01,
        gt=0,
        description=("Peak learning rate (before the schedule). MTT evaluation replaces it by the learned syn_lr."),
    )
    momentum: float = Field(
        0.9, ge=0, lt=1, description=("SGD momentum (ignored by adam/adamw). MTT experts use 0, evaluation 0.9.")
    )
    weight_decay: float = Field(
        5e-4, ge=0, description=("L2 penalty on all parameters, norms and biases included (as MTT/DC).")
    )
    schedule: ScheduleName = Field(
        "step",
        description=(
            "Learning-rate multiplier, updated every step: step = x0.1 from half of training "
            "(MTT/DC evaluation), cosine = down to 0 (KRR-ST fine-tuning), constant = none (MTT experts)."
        ),
    )
    loss: LossName = Field(
        "ce",
        description=(
            "ce: integer class labels [N]; soft_ce: [N, K] probabilities or logits; "
            "mse: regression targets (KRR-ST representations)."
        ),
    )
    augment: AugmentName = Field(
        "flip_crop",
        description=(
            "Training augmentation: flip_crop = the CIFAR recipe; dsa = differentiable Siamese "
            "augmentation, as MTT evaluates distilled sets; none = KRR-ST pretraining (the paper uses none)."
        ),
    )
    optimizer: OptimizerName = Field("sgd", description="Optimizer; adamw is the KIP/FRePo pretraining recipe.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description=("Label smoothing of the cross-entropy (ce/soft_ce only; 0 = off).")
    )
    eval_every: int = Field(
        0,
        ge=0,
        description=(
            "Epochs between held-out evaluations; 0 = only after the last epoch. Logged only, "
            "never used to pick the reported number."
        ),
    )

    @model_validator(mode="after")
    def _smoothing_needs_classes(self) -> TrainConfig:
        if self.loss == "mse" and self.label_smoothing > 0:
            raise ValueError(f"label_smoothing={self.label_smoothing} has no meaning with loss='mse'")
        return self


@dataclass
class TrainResult:
    history: list[dict]  # one record per epoch: epoch, loss, train_acc (+ test_acc, test_loss when evaluated)
    final: dict  # the last epoch's record: the reported numbers
    seconds: float  # wall time of the training loop, evaluations included
    peak_memory_mb: float  # CUDA: peak allocated during this run; CPU: peak RSS of the process so far


def _prepare_targets(y: torch.Tensor, loss: str, n: int) -> torch.Tensor:
    """Check targets against the loss; soft_ce turns logits into probabilities once, up front."""
    if y.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    if loss == "ce":
        if y.dim() != 1 or y.is_floating_point() or y.is_complex():
            raise ValueError(f"loss 'ce' needs integer class labels [N]; got {y.dtype} {tuple(y.shape)}")
        return y.long()
    if y.dim() != 2 or not y.is_floating_point():
        raise ValueError(f"loss {loss!r} needs float targets [N, K]; got {y.dtype} {tuple(y.shape)}")
    y = y.float()
    # Rows that are non-negative and sum to 1 are probabilities already; anything else is logits.
    if loss == "soft_ce":
        is_prob = bool((y >= 0).all()) and torch.allclose(y.sum(1), torch.ones_like(y[:, 0]), atol=1e-3)
        if not is_prob:
            y = y.softmax(1)
    return y


def check_finite_losses(step_losses: torch.Tensor, where: str, settings: str) -> None:
    """Raise FloatingPointError naming the first non-finite step of an epoch's per-step losses.

    Checked once per epoch on the device (one sync), not after every step.
    """
    finite = torch.isfinite(step_losses)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0]) + 1
        raise FloatingPointError(
            f"non-finite training loss at {where}, step {bad}/{len(step_losses)} "
            f"({settings}); lower the lr or check the inputs for inf/nan"
        )


def train(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 1,
) -> TrainResult:
    """Train `net` in place on (x, y) and return per-epoch history and final-epoch numbers.

    x: float32 [N, ...] already preprocessed; y: int64 [N] (ce) or float [N, K] (soft_ce, mse).
    eval_data: held-out (x, int labels), evaluated every cfg.eval_every epochs and after the last.
    progress(epoch, epochs, loss=..., acc=..., [test_acc=..., test_loss=...]) once per epoch.
    train_acc is measured on the augmented batches while training (for soft_ce and mse: argmax
    agreement with the target).
    checkpoint: commits the net, optimizer, schedule and sampling generator every
    `checkpoint_every` epochs (before the last); a run restarted with the same checkpoint (the
    caller's identity names the config, seed and data) resumes after its last commit and ends
    bit-identical to an uninterrupted run. `net` must be freshly built as for the first start.
    Raises FloatingPointError, naming epoch and step, when the loss stops being finite.
    """
    dev = resolve_device(device)
    keep_freed_memory()  # CPU: reuse freed activations instead of page-faulting new ones (distill.allocator)
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    y = _prepare_targets(y, cfg.loss, n).to(dev)
    x = x.to(dev, torch.float32)
    net.to(dev)
    generator = torch.Generator().manual_seed(seed)
    augment, loss_fn = AUGMENTS[cfg.augment], LOSSES[cfg.loss]
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = OPTIMIZERS[cfg.optimizer](net.parameters(), cfg)
    schedule = SCHEDULES[cfg.schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step / total_steps))
    labels = y if y.dim() == 1 else y.argmax(1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    history: list[dict] = []
    start, seconds_before, first_epoch = time.perf_counter(), 0.0, 1
    if checkpoint is not None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 epoch; got {checkpoint_every}")
        saved = checkpoint.load()
        if saved is not None:
            load_module_tensors("net", net, saved.tensors)
            load_optimizer_tensors("optimizer", optimizer, saved.tensors, saved.record["optimizer"])
            scheduler.load_state_dict(saved.record["scheduler"])
            generator.set_state(saved.tensors["generator"])
            history, seconds_before = saved.record["history"], saved.record["seconds"]
            first_epoch = saved.step + 1
    for epoch in range(first_epoch, cfg.epochs + 1):
        net.train()
        order = torch.randperm(n, generator=generator).to(dev)
        # Per-step losses stay on the device and are checked once per epoch: no host sync per step.
        step_losses, correct = [], torch.zeros((), device=dev)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            out = net(augment(x[idx], generator))
            loss = loss_fn(out, y[idx], cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_losses.append(loss.detach() * len(idx))
            correct += (out.detach().argmax(1) == labels[idx]).sum()
        step_losses = torch.stack(step_losses)
        check_finite_losses(step_losses, f"epoch {epoch}/{cfg.epochs}", f"lr={cfg.lr}, optimizer={cfg.optimizer}")
        record = {"epoch": epoch, "loss": step_losses.sum().item() / n, "train_acc": correct.item() / n}
        if eval_data is not None and (epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0)):
            metrics = evaluate(net, *eval_data, device=dev)
            record.update(test_acc=metrics["acc"], test_loss=metrics["loss"])
        history.append(record)
        if checkpoint is not None and epoch < cfg.epochs and epoch % checkpoint_every == 0:
            opt_tensors, opt_rest = optimizer_tensors("optimizer", optimizer)
            checkpoint.save(
                epoch,
                {**module_tensors("net", net), **opt_tensors, "generator": generator.get_state()},
                {
                    "optimizer": opt_rest,
                    "scheduler": scheduler.state_dict(),  # JSON: a plain lambda is stored as None
                    "history": history,
                    "seconds": seconds_before + time.perf_counter() - start,
                },
            )
        if progress is not None:
            extra = {k: record[k] for k in ("test_acc", "test_loss") if k in record}
            progress(epoch, cfg.epochs, loss=record["loss"], acc=record["train_acc"], **extra)
    return TrainResult(history, dict(history[-1]), seconds_before + time.perf_counter() - start, peak_memory_mb(dev))


@torch.no_grad()
def _batched_eval(
    net: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dev: torch.device, batch_size: int
) -> torch.Tensor:
    """fn over x in eval mode, batch by batch, outputs gathered on the CPU; restores the net's mode."""
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = net.training
    net.to(dev).eval()
    try:
        batches = (x[i : i + batch_size].to(dev, torch.float32) for i in range(0, x.shape[0], batch_size))
        return torch.cat([fn(b).float().cpu() for b in batches])
    finally:
        net.train(was_training)


def evaluate(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
) -> dict:
    """Top-1 accuracy and mean cross-entropy of `net` on (x, int labels): {"acc", "loss", "n"}."""
    logits = _batched_eval(net, net, x, resolve_device(device), batch_size)
    y = y.cpu().long()
    return {
        "acc": (logits.argmax(1) == y).float().mean().item(),
        "loss": F.cross_entropy(logits, y).item(),
        "n": int(y.shape[0]),
    }


def extract_features(
    net: nn.Module, x: torch.Tensor, *, device: str | torch.device | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """net.embed(x) in eval mode without gradients, as a CPU float32 tensor [N, feature_dim]."""
    return _batched_eval(net, net.embed, x, resolve_device(device), batch_size)

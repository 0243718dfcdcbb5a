"""Expert training for trajectory matching: MTT, AST ("smooth") and SAM/FTD ("flat") experts.

An expert is a net trained on the real data whose parameters are snapshotted after init and
after every epoch (distill.trajectory stores them). Distillation later matches segments of
these trajectories, so how an expert is trained shapes what can be distilled:

  mtt  MTT's buffer.py: SGD lr 0.01, no momentum, no weight decay, DSA, batch 256, 50 epochs.
  ast  AST's buffer.py: SGD lr 0.003, momentum 0.9, wd 1e-3, lr x0.6 after the middle epoch,
       a "clipping loss" that scales the CE by 0.5, 0.55, ..., 0.95 in the first 10 epochs
       (a loss-scale warm-up), and a gradient penalty 2 * mean((|d sum(logits)/dx|_c - 1)^2),
       the norm taken over channels per pixel, on the un-augmented batch. (The repository's
       commits differ: lr 0.003/0.004, ramps [0.5..0.9] of 5 or 11 steps, lambda 0.1 or 2;
       the values here are those of its latest `AST/buffer.py`, and all are config fields.)
  sam  FTD's flat experts: MTT's recipe with SAM (rho 0.01) instead of plain SGD steps.

Differences from the reference code, each on purpose: the gradient penalty runs on any device
(the reference hard-codes .cuda()); seeds come from (seed, expert_id), never the clock; at the
lr drop the momentum buffer is kept (the reference rebuilds the optimizer, zeroing it, which
puts a kink into the smooth trajectory AST is after).

Training is resumable. After every snapshot the expert writes, beside its output file
(expert-00007.parquet -> expert-00007.ckpt/): the snapshot as a one-row trajectory file, then
a distill.checkpoint commit of the model, optimizer and RNG tensors. A restarted run with the same
config continues from the last snapshot and produces a
trajectory bit-identical to an uninterrupted one; the finished trajectory is written atomically
with complete=True and the checkpoint removed. Re-running a finished expert returns at once.
Pure: imports neither prefect nor ray.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from distill.allocator import keep_freed_memory
from distill.augment import AUGMENTS, AugmentName
from distill.checkpoint import (
    Checkpoint,
    check_identity,
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
)
from distill.nets import NetFields, NetName, create_net, flatten_params, param_layout
from distill.precision import PrecisionField, precision_context
from distill.registry import Registry
from distill.train import check_finite_losses, evaluate
from distill.trajectory import Snapshot, TrajectoryReader, param_change, write_trajectory
from distill.utils import Progress, derive_seed, resolve_device

# AST's clipping-loss ramp: CE x 0.5, 0.55, ..., 0.95 in epochs 1..10, then x 1.
AST_LOSS_RAMP = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]

# A finished expert whose final train loss is above this multiple of its untrained net's loss
# (about ln(num_classes)) diverged or never learned; it is refused instead of published.
DIVERGED_LOSS_FACTOR = 10.0

# recipe name -> the field values it presets; fields given explicitly override them.
RECIPES: Registry[dict[str, Any]] = Registry(
    "expert recipe",
    {
        "mtt": {},  # the ExpertConfig defaults are MTT's
        "ast": {
            "lr": 0.003,
            "momentum": 0.9,
            "weight_decay": 1e-3,
            "lr_drop_epoch": "mid",
            "lr_drop_factor": 0.6,
            "loss_ramp": AST_LOSS_RAMP,
            "grad_penalty": 2.0,
        },
        "sam": {"sam_rho": 0.01},  # FTD: buffer_FTD.py --rho_max 0.01 --rho_min 0.01 on MTT's recipe
    },
)
RecipeName = RECIPES.name_type()


class ExpertConfig(NetFields, PrecisionField, frozen=True, extra="forbid"):
    """How to train a pool of experts. `recipe` presets the other fields (see RECIPES)."""

    recipe: RecipeName = Field(
        "mtt",
        description=(
            "Expert recipe presetting the other fields unless they are given: mtt = MTT's buffer.py, "
            "ast = AST's smooth experts, sam = FTD's flat experts (SAM steps)."
        ),
    )
    net: NetName = Field("convnet", description="Expert net (a distill.nets name); distillation must use the same net.")
    net_kwargs: dict[str, Any] = Field(
        {}, description=("Options of the net, e.g. {width: 128, depth: 3}: MTT's ConvNet-3 at 32 px.")
    )
    epochs: int = Field(
        50,
        ge=1,
        description=(
            "Training epochs per expert, one snapshot each (MTT/AST: 50); matching needs "
            "max_start_epoch + expert_epochs of them."
        ),
    )
    batch_size: int = Field(256, ge=1, description="Images per SGD step (MTT batch_train: 256).")
    lr: float = Field(
        0.01, gt=0, description=("SGD learning rate (MTT lr_teacher 0.01; AST 0.003: slower, smoother experts).")
    )
    momentum: float = Field(0.0, ge=0, lt=1, description=("SGD momentum (MTT: 0; AST: 0.9, as its students use)."))
    weight_decay: float = Field(0.0, ge=0, description=("SGD weight decay on every parameter (MTT: 0; AST: 1e-3)."))
    # "mid" is where MTT --decay and AST drop: both after their 0-based epoch epochs // 2 + 1
    lr_drop_epoch: int | Literal["mid"] | None = Field(
        None,
        description=(
            "1-based epoch from which the lr is multiplied by lr_drop_factor; mid = epochs // 2 + 3; "
            "empty = constant lr."
        ),
    )
    lr_drop_factor: float = Field(0.1, gt=0, description="lr multiplier at lr_drop_epoch (MTT --decay: 0.1; AST: 0.6).")
    augment: AugmentName = Field("dsa", description="Training augmentation (MTT and AST train experts with DSA).")
    loss_ramp: list[float] | None = Field(
        None,
        description=(
            "CE multipliers for epochs 1..len(loss_ramp), 1 afterwards (AST's clipping loss: 0.5, 0.55, "
            "..., 0.95, a warm-up); empty = none."
        ),
    )
    grad_penalty: float = Field(
        0.0,
        ge=0,
        description=(
            "AST gradient-penalty weight lambda (2) on the input gradient of the logits; 0 = off "
            "(saves an extra forward and a double backward)."
        ),
    )
    sam_rho: float = Field(
        0.0, ge=0, description=("SAM ascent radius (FTD: 0.01); 0 = plain SGD steps; > 0 doubles the cost per step.")
    )
    num_experts: int = Field(
        100, ge=1, description=("Experts to train (MTT/AST/FTD: 100); not part of an expert's own recipe.")
    )
    seed: int = Field(0, description=("Expert i is seeded from (seed, i), so any expert can be (re)trained alone."))

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {**RECIPES[RECIPES.check(data.get("recipe", "mtt"))], **data}

    @field_validator("loss_ramp")
    @classmethod
    def _positive_ramp(cls, ramp: list[float] | None) -> list[float] | None:
        if ramp is not None and (not ramp or any(not (s > 0 and math.isfinite(s)) for s in ramp)):
            raise ValueError(f"loss_ramp must be a non-empty list of positive numbers or None, got {ramp}")
        return ramp

    def lr_at(self, epoch: int) -> float:
        """Learning rate during 1-based `epoch`."""
        drop = self.epochs // 2 + 3 if self.lr_drop_epoch == "mid" else self.lr_drop_epoch
        return self.lr * (self.lr_drop_factor if drop is not None and epoch >= drop else 1.0)

    def loss_scale(self, epoch: int) -> float:
        """CE multiplier during 1-based `epoch` (the clipping-loss ramp)."""
        ramp = self.loss_ramp or []
        return ramp[epoch - 1] if epoch <= len(ramp) else 1.0

    def expert_recipe(self) -> dict:
        """What one expert's trajectory depends on: every field but num_experts."""
        return self.model_dump(mode="json", exclude={"num_experts"})


def checkpoint_dir(out_path: str | Path) -> Path:
    """expert-00007.parquet -> expert-00007.ckpt/ (same directory: same filesystem, renames stay atomic)."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".ckpt")


# ---------------------------------------------------------------- one training step


def _gradient_penalty(net: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor:
    """AST's penalty: weight * mean over pixels of (||d sum(logits) / dx||_channels - 1)^2."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    return weight * ((torch.linalg.vector_norm(grad, dim=1) - 1) ** 2).mean()


def _objective(
    net: nn.Module, x_aug: torch.Tensor, x_clean: torch.Tensor, y: torch.Tensor, scale: float, gp_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to minimize, logits, plain CE, penalty) for one batch."""
    out = net(x_aug)
    ce = F.cross_entropy(out, y)
    gp = _gradient_penalty(net, x_clean, gp_weight) if gp_weight > 0 else torch.zeros((), device=out.device)
    return scale * ce + gp, out, ce, gp


def _sam_step(net: nn.Module, optimizer: torch.optim.Optimizer, objective: Callable[[], tuple], rho: float) -> tuple:
    """SAM: step with the gradient taken at w + rho * g / ||g||, the worst nearby point to first order."""
    first = objective()
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(first[0], params, allow_unused=True)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
    scale = rho / (norm + 1e-12)
    # Restoring copies (not subtracting the perturbation back) keeps w bit-exact.
    originals = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.add_(g * scale)
    optimizer.zero_grad(set_to_none=True)
    objective()[0].backward()
    with torch.no_grad():
        for p, original in zip(params, originals):
            p.copy_(original)
    optimizer.step()
    return first


def _plain_step(net: nn.Module, optimizer: torch.optim.Optimizer, objective: Callable[[], tuple]) -> tuple:
    result = objective()
    optimizer.zero_grad(set_to_none=True)
    result[0].backward()
    optimizer.step()
    return result


def _train_epoch(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    cfg: ExpertConfig,
    epoch: int,
    expert_id: int,
) -> dict:
    """One pass over (x, y); returns the epoch's train metrics. Raises on a non-finite loss."""
    lr, scale = cfg.lr_at(epoch), cfg.loss_scale(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr  # a function of the epoch only, so a resumed run sets the same value
    augment = AUGMENTS[cfg.augment]
    n, batch_size = x.shape[0], min(cfg.batch_size, x.shape[0])
    net.train()
    order = torch.randperm(n, generator=generator).to(x.device)
    # Sums stay on the device and are read once per epoch: no host sync per step.
    losses, ces, gps, correct = [], [], [], torch.zeros((), device=x.device)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        xb, yb = x[idx], y[idx]
        x_aug = augment(xb, generator)  # drawn once per step, so SAM's second pass sees the same batch
        # bound now: SAM calls it twice within this step
        objective = lambda x_aug=x_aug, xb=xb, yb=yb: _objective(net, x_aug, xb, yb, scale, cfg.grad_penalty)  # noqa: E731
        if cfg.sam_rho > 0:
            loss, out, ce, gp = _sam_step(net, optimizer, objective, cfg.sam_rho)
        else:
            loss, out, ce, gp = _plain_step(net, optimizer, objective)
        losses.append(loss.detach() * len(idx))
        ces.append(ce.detach() * len(idx))
        gps.append(gp.detach() * len(idx))
        correct += (out.detach().argmax(1) == yb).sum()
    losses = torch.stack(losses)
    check_finite_losses(losses, f"epoch {epoch}/{cfg.epochs} of expert {expert_id}", f"recipe {cfg.recipe!r}, lr {lr}")
    return {
        "loss": losses.sum().item() / n,
        "train_loss": torch.stack(ces).sum().item() / n,
        "grad_penalty": torch.stack(gps).sum().item() / n,
        "train_acc": correct.item() / n,
        "lr": lr,
    }


# ---------------------------------------------------------------- checkpoints


class _Checkpoint:
    """The resume state of one expert, in expert-NNNNN.ckpt/ beside its output file.

    rows/epoch-EEEEE.parquet  each snapshot so far, a one-row trajectory file (complete=False)
    state files               a distill.checkpoint commit: model, optimizer and CPU generator
                              tensors; its step is the epoch of the last snapshot
    """

    def __init__(self, out_path: Path, identity: dict, layout: list, meta: dict):
        self.dir = checkpoint_dir(out_path)
        self.state = Checkpoint(self.dir, identity, kind="expert")
        self.layout, self.meta = layout, meta

    def _row_path(self, epoch: int) -> Path:
        return self.dir / "rows" / f"epoch-{epoch:05d}.parquet"

    def save(
        self, snapshot: Snapshot, net: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> None:
        # The row first: a commit of epoch e always finds rows 0..e on disk.
        write_trajectory(self._row_path(snapshot.epoch), [snapshot], self.layout, {**self.meta, "complete": False})
        optim, optim_rest = optimizer_tensors("optim", optimizer)
        tensors = {**module_tensors("model", net), **optim, "rng.cpu": generator.get_state()}
        self.state.save(snapshot.epoch, tensors, {"optimizer": optim_rest})

    def restore(self, net: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int | None:
        """Load the last saved state into net/optimizer/generator; its epoch, or None if there is none."""
        saved = self.state.load()
        if saved is None:
            return None
        load_module_tensors("model", net, saved.tensors)
        load_optimizer_tensors("optim", optimizer, saved.tensors, saved.record["optimizer"])
        generator.set_state(saved.tensors["rng.cpu"])
        return saved.step

    def snapshots(self, last_epoch: int) -> Iterator[Snapshot]:
        """The saved snapshots 0..last_epoch, streamed one at a time."""
        for epoch in range(last_epoch + 1):
            with TrajectoryReader(self._row_path(epoch), allow_incomplete=True) as reader:
                yield from reader.iter_snapshots()

    def metrics(self, epoch: int) -> dict:
        """The metrics row (losses, accuracies) saved with the snapshot of `epoch`."""
        with TrajectoryReader(self._row_path(epoch), allow_incomplete=True) as reader:
            return reader.metrics()[0]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def check_not_diverged(initial_loss: float, final_loss: float, cfg: ExpertConfig, expert_id: int) -> None:
    """Refuse an expert whose final train loss (plain CE) is non-finite or above DIVERGED_LOSS_FACTOR
    times the untrained net's test loss: its trajectory would teach distillation nothing."""
    bound = DIVERGED_LOSS_FACTOR * initial_loss
    if not (math.isfinite(final_loss) and final_loss <= bound):
        raise FloatingPointError(
            f"expert {expert_id} diverged: final train loss {final_loss:.4g} after {cfg.epochs} epochs is above "
            f"{DIVERGED_LOSS_FACTOR:g}x the untrained net's loss {initial_loss:.4g} (recipe {cfg.recipe!r}, "
            f"lr {cfg.lr}); lower lr"
        )


# ---------------------------------------------------------------- the expert


def _check_data(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> None:
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.dim() != 4 or x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{name}: need images [N>0, C, H, W] and N labels; got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.dim() != 1 or int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(
                f"{name}: labels must be integers in [0, {num_classes}); got {y.dtype} range "
                f"[{int(y.min())}, {int(y.max())}]"
            )
    train_shape, test_shape = tuple(train_x.shape[1:]), tuple(test_x.shape[1:])
    if train_shape != test_shape or train_shape[1] != train_shape[2]:
        raise ValueError(f"train and test images must share one square shape; got {train_shape} and {test_shape}")


def _identity(
    cfg: ExpertConfig,
    expert_id: int,
    num_classes: int,
    train_x: torch.Tensor,
    test_x: torch.Tensor,
    dataset_fingerprint: str,
    preprocessor_fingerprint: str,
) -> dict:
    """Everything an expert's trajectory depends on, as JSON values (so stored and fresh compare equal)."""
    identity = {
        "expert_id": expert_id,
        "net": cfg.net,
        "net_kwargs": cfg.net_kwargs,
        "num_classes": num_classes,
        "channels": train_x.shape[1],
        "image_size": train_x.shape[2],
        "recipe": cfg.expert_recipe(),
        "seed": cfg.seed,
        "dataset_fingerprint": dataset_fingerprint,
        "preprocessor_fingerprint": preprocessor_fingerprint,
        # Cheap guards for callers that pass no fingerprints.
        "train_size": train_x.shape[0],
        "test_size": test_x.shape[0],
    }
    return json.loads(json.dumps(identity))


def _finished(out_path: Path, identity: dict) -> bool:
    """True when out_path holds this expert's complete trajectory; raises if it holds another's."""
    if not out_path.exists():
        return False
    with TrajectoryReader(out_path) as done:
        stored = {k: done.meta.get(k) for k in identity}
        complete = done.complete
    check_identity(stored, identity, f"trajectory {out_path}", "delete it or choose another output path")
    if complete:
        shutil.rmtree(checkpoint_dir(out_path), ignore_errors=True)  # left over if a run died right after finishing
    return complete


def _summary(out_path: Path, seconds: float, resumed_from: int | None, reused: bool) -> dict:
    with TrajectoryReader(out_path) as reader:
        final = reader.metrics()[-1]
        return {
            "path": str(out_path),
            "expert_id": reader.meta["expert_id"],
            "recipe": reader.meta["recipe"]["recipe"],
            "epochs": final["epoch"],
            "num_params": reader.num_params,
            **{k: final[k] for k in ("train_acc", "train_loss", "test_acc", "test_loss")},
            "seconds": seconds,
            "resumed_from": resumed_from,
            "reused": reused,
        }


def train_expert(
    cfg: ExpertConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int,
    expert_id: int,
    out_path: str | Path,
    dataset_fingerprint: str = "",
    preprocessor_fingerprint: str = "",
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train expert `expert_id` and write its trajectory (epochs + 1 snapshots) to `out_path`.

    Resumes from `out_path`'s checkpoint when one exists (same config required), returns at
    once when `out_path` already holds this expert's complete trajectory.
    progress(epoch, epochs, loss=, acc=, test_acc=, test_loss=, param_change=, expert=) after
    every epoch, once that epoch is saved. Returns {"path", "expert_id", "recipe", "epochs",
    "num_params", "train_acc", "train_loss", "test_acc", "test_loss", "seconds",
    "resumed_from", "reused"}, the accuracies and losses of the final epoch.
    """
    start_time = time.perf_counter()
    out_path = Path(out_path)
    _check_data(train_x, train_y, test_x, test_y, num_classes)
    identity = _identity(cfg, expert_id, num_classes, train_x, test_x, dataset_fingerprint, preprocessor_fingerprint)
    if _finished(out_path, identity):
        return _summary(out_path, time.perf_counter() - start_time, None, reused=True)

    dev = resolve_device(device)
    keep_freed_memory()  # CPU: reuse freed activations instead of page-faulting new ones (distill.allocator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, expert_id, "init"))
        net = create_net(
            cfg.net,
            num_classes=num_classes,
            channels=identity["channels"],
            image_size=identity["image_size"],
            **cfg.net_kwargs,
        )
    net.to(dev)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, expert_id, "data"))
    layout = param_layout(net)
    meta = {**identity, "epochs_planned": cfg.epochs}
    checkpoint = _Checkpoint(out_path, identity, layout, meta)

    resumed_from = checkpoint.restore(net, optimizer, generator)
    x, y = train_x.to(dev, torch.float32), train_y.to(dev, torch.long)
    previous = flatten_params(net).cpu()
    if resumed_from is None:
        checkpoint.save(Snapshot(0, previous, **_test_metrics(net, test_x, test_y, dev)), net, optimizer, generator)
    try:
        for epoch in range((resumed_from or 0) + 1, cfg.epochs + 1):
            with precision_context(cfg.precision, x.device):  # fp32 (default) | tf32 | bf16 autocast
                train_metrics = _train_epoch(net, optimizer, x, y, generator, cfg, epoch, expert_id)
            current = flatten_params(net).cpu()
            if not bool(torch.isfinite(current).all()):
                raise FloatingPointError(
                    f"expert {expert_id} diverged at epoch {epoch}/{cfg.epochs}: non-finite parameters "
                    f"(recipe {cfg.recipe!r}, lr {cfg.lr_at(epoch)}); lower lr"
                )
            test_metrics = _test_metrics(net, test_x, test_y, dev)
            checkpoint.save(Snapshot(epoch, current, **train_metrics, **test_metrics), net, optimizer, generator)
            if progress is not None:
                progress(
                    epoch,
                    cfg.epochs,
                    loss=train_metrics["loss"],
                    acc=train_metrics["train_acc"],
                    param_change=param_change(previous, current),
                    expert=expert_id,
                    **test_metrics,
                )
            previous = current
        check_not_diverged(
            checkpoint.metrics(0)["test_loss"], checkpoint.metrics(cfg.epochs)["train_loss"], cfg, expert_id
        )
    except FloatingPointError:
        checkpoint.remove()  # resuming would replay the same divergence: the next run starts over
        raise

    write_trajectory(out_path, checkpoint.snapshots(cfg.epochs), layout, {**meta, "complete": True})
    checkpoint.remove()
    return _summary(out_path, time.perf_counter() - start_time, resumed_from, reused=False)


def _test_metrics(net: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, dev: torch.device) -> dict:
    result = evaluate(net, test_x, test_y, device=dev)
    return {"test_acc": result["acc"], "test_loss": result["loss"]}


# ---------------------------------------------------------------- trajectory smoothness


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def smoothness(reader: TrajectoryReader) -> dict:
    """Per-epoch curves and scalar smoothness summaries of one expert, to compare recipes.

    param_change: L2 step per epoch; train_loss: plain CE per epoch (ramp and penalty excluded,
    so recipes compare); loss_roughness: mean |second difference| of train_loss (0 for a
    straight line); param_change_cv: std / mean of the steps (0 = even pace); mean_turn_cosine:
    mean cosine between consecutive epoch displacements (1 = straight trajectory). A summary
    is None where the trajectory is too short for it.
    """
    rows = [r for r in reader.metrics() if r["epoch"] > 0]
    change = [r["param_change"] for r in rows]
    loss = [r["train_loss"] for r in rows]
    mean_change = _mean(change)
    cv = None
    if mean_change:
        cv = math.sqrt(_mean([(c - mean_change) ** 2 for c in change])) / mean_change
    second = [abs(loss[i + 1] - 2 * loss[i] + loss[i - 1]) for i in range(1, len(loss) - 1)]
    return {
        "epochs": [r["epoch"] for r in rows],
        "param_change": change,
        "train_loss": loss,
        "test_acc": [r["test_acc"] for r in rows],
        "mean_param_change": mean_change,
        "param_change_cv": cv,
        "loss_roughness": _mean(second),
        "mean_turn_cosine": _mean(_turn_cosines(reader)),
        "final_test_acc": rows[-1]["test_acc"] if rows else None,
    }


def _turn_cosines(reader: TrajectoryReader) -> list[float]:
    """cos(angle) between the displacements of consecutive epochs, two snapshots in memory at a time."""
    cosines, previous, delta = [], None, None
    for epoch in reader.epochs:
        current = reader.snapshot(epoch).double()
        if previous is not None:
            step = current - previous
            if delta is not None:
                cosines.append(F.cosine_similarity(delta, step, dim=0, eps=1e-30).item())
            delta = step
        previous = current
    return cosines

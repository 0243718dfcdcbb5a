"""Trajectory-matching distillation: MTT (Cazenavette et al. 2022) with AST's improvements.

A few synthetic images per class are learned so that a student trained on them for
`syn_steps` SGD steps, starting from an expert snapshot at a random epoch, lands where the
expert was `expert_epochs` epochs later:

    L = ||theta_N - theta*_{t+M}||^2 / ||theta_0 - theta*_{t+M}||^2

The student runs on a flat parameter vector (`torch.func.functional_call` on views of it),
every inner step sees a DSA-augmented minibatch of the synthetic images, and the inner
learning rate is learned too. Images and lr are updated by SGD with momentum 0.5 (MTT).

AST's changes are config switches, all off by default (MTT):
  init="representative"  K-means on an expert's logits per class, the real image nearest each
                         centre; works at 1 image per class (AST's code returns none there).
  balance_loss           inner CE x log5(t - h + 8) for late starts, / log5(h - t + 8) for
                         early ones (h = max_start_epoch // 2).
  intermediate_loss      also match theta at inner step (N // M) * i to the expert epoch t + i,
                         weight 1 ("constant") or i / M ("adaptive").
  weight_perturb         conv weights of the student's start w <- w + s * d * w, d ~ N(0, I)
                         scaled to unit Frobenius norm (AST: s = 1).
  student_momentum       inner steps b = mu * b + g, theta -= lr * b (AST: 0.9, like its experts).

Follow-up switches (FOLLOW_UPS), each off by default and independent of the others:
  ema_decay              publish an exponential moving average of the images instead of the last
                         iterate (FTD, Du et al. 2023; ATT), bias-corrected: ema_t / (1 - d^t) with
                         ema_t = d * ema_{t-1} + (1 - d) * images_t, ema_0 = 0.
  soft_labels            learnable soft labels (DATM, Guo et al. 2024, "Towards Lossless Dataset
                         Distillation via Difficulty-Aligned Trajectory Matching"): logits
                         initialised from the experts' mean logits on the initial images, the inner
                         CE taken against their softmax, updated by SGD (lr_labels, momentum 0.9).
  min_start_epoch, initial_max_start_epoch, window_growth
                         DATM's difficulty-aligned window: start epochs uniform over [min, upper],
                         upper growing linearly from initial_max_start_epoch to max_start_epoch over
                         window_growth iterations (its "sequential generation").

Memory modes (MEMORY_MODES), all exact:
  unrolled  backprop through the whole inner loop (MTT); the graph of every step is kept, so
            memory grows linearly with syn_steps.
  constant  reverse-mode accumulation by hand (the adjoint of the inner loop). A forward pass
            without a graph stores only the flat parameter vectors theta_0..theta_N; then, step
            by step in reverse, one inner step is recomputed with a graph (same batch, same
            replayed DSA parameters) and a Hessian-vector product carries the adjoint back:
                u_k      = thetabar_{k+1} + mu * u_{k+1}        (u_N = 0)
                vtilde_k = -lr * u_k                            (adjoint of the step's gradient g_k)
                thetabar_k = thetabar_{k+1} + H_k vtilde_k + dL/dtheta_k (matching terms)
                imagesbar += (d g_k / d images)^T vtilde_k,     lrbar -= g_k . u_k
            Every term of the unrolled gradient is kept (cross-step terms included, unlike
            TESLA's code), so the two modes agree to rounding (tests check float64 to 1e-9).
            Memory: one inner step's double-backward graph plus (N + 1) parameter vectors,
            i.e. 4 bytes x num_params x (N + 1) (1.3 MB x 81 for MTT's CIFAR ConvNet at N=80),
            against the unrolled graph of N steps of activations. Time: about one extra
            forward/backward per step.
  budget    checkpointed unrolling within memory_budget_mb: the graphs of K steps at a time, K as
            many as fit (one step's graph memory is measured once per run). A forward pass without
            graphs stores (theta, velocity) every K steps counting back from the end; the last K
            steps keep their graph, each earlier segment is recomputed with its graph and
            backpropagated with its end state's adjoints. Extra time: N - K steps of forward and
            first backward (none when all fit); memory: K step graphs.
  auto      unrolled if all N step graphs fit in memory_budget_mb, budget if one does, else constant.

Long runs survive: with a `work_dir`, a checkpoint (images, lr, both momentum buffers, the
RNG state, iteration, current image lr, loss curve) is written every `checkpoint_every`
iterations, and a restarted run with the same config resumes from it and gives the same
result as an uninterrupted run. A non-finite loss or a learning rate that is no longer
positive stops the run with a clear error, or (on_divergence="rollback") returns to the last
checkpoint with the image lr multiplied by rollback_factor.

    from distill.matching import MatchConfig, match_trajectories
    result = match_trajectories(MatchConfig(ipc=1, iterations=200), TrajectorySet(dir), x, y, num_classes=10)

Pure: imports neither prefect nor ray.
"""

from __future__ import annotations

import functools
import json
import math
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator, model_validator

from distill.allocator import keep_freed_memory
from distill.augment import DSAConfig, DSAParams, apply_params, sample_params
from distill.checkpoint import Checkpoint, CheckpointError
from distill.data import check_ipc as data_check_ipc
from distill.formats import MAX_PIXEL_RANGE_FACTOR
from distill.graph_memory import GraphMemoryMeter
from distill.nets import create_net, fast_net_kwargs, unflatten_params
from distill.precision import Precision, precision_context
from distill.registry import Registry
from distill.trajectory import TrajectorySet, layout_from_json
from distill.utils import Progress, resolve_device, tensor_digest


class MatchingError(ValueError):
    """Inputs that cannot be distilled (bad ipc, mismatched expert set, too-short trajectories)."""


class MatchingDiverged(FloatingPointError):
    """The matching loss stopped being finite or the learned lr stopped being positive."""


# ---------------------------------------------------------------- config


class MatchConfig(BaseModel, frozen=True, extra="forbid"):
    """Trajectory matching. Defaults: MTT's distill.py CLI defaults, AST switches off."""

    ipc: int = Field(1, ge=1, description="Synthetic images per class.")
    iterations: int = Field(
        5000,
        ge=1,
        description=("Outer updates of the images and the learned lr (MTT: 5000); a finished run resumes to more."),
    )
    syn_steps: int = Field(
        20,
        ge=1,
        description=(
            "N: student SGD steps on the synthetic images per iteration (MTT: 20 by default, 10-80 in its tables)."
        ),
    )
    expert_epochs: int = Field(
        3, ge=1, description=("M: the target is the expert snapshot M epochs after the start epoch.")
    )
    # MTT's randint excludes T+, so MTT's T+ = 20 is 19 here
    max_start_epoch: int = Field(
        19,
        ge=0,
        description=(
            "Start epochs are drawn uniformly from min_start_epoch..max_start_epoch inclusive; "
            "max_start_epoch + expert_epochs must not exceed the experts' stored epochs."
        ),
    )
    lr_img: float = Field(
        1000.0, gt=0, description=("SGD learning rate of the image pixels; MTT tunes it on a 10^n grid (100 .. 1e5).")
    )
    lr_lr: float = Field(1e-5, ge=0, description="SGD learning rate of the learned student lr; 0 freezes it.")
    lr_init: float = Field(
        0.01, gt=0, description=("alpha_0: the student learning rate to start from (MTT: lr_teacher, 0.01).")
    )
    momentum_img: float = Field(0.5, ge=0, lt=1, description="SGD momentum of the images (MTT: 0.5).")
    momentum_lr: float = Field(0.5, ge=0, lt=1, description="SGD momentum of the learned lr (MTT: 0.5).")
    batch_syn: int | None = Field(
        None, ge=1, description=("Synthetic images per student step; empty = all of them (MTT's default).")
    )
    dsa: DSAConfig | None = Field(
        DSAConfig(), description=("Augmentation of the student's batches (MTT: DSA); empty = none.")
    )
    # INITS and MEMORY_MODES are defined below with their implementations: their choices enter
    # the JSON schema (a drop-down in the run form) when it is generated; the validators check names
    init: str = Field(
        "real",
        json_schema_extra=lambda s: s.update(enum=INITS.choices()),
        description=(
            "Initial images: real = ipc random real images per class (MTT), noise = standard normal "
            "pixels, representative = per class the real images nearest K-means centres of an expert's logits "
            "(AST)."
        ),
    )
    balance_loss: bool = Field(
        False,
        description=(
            "AST's balanced loss (--balance_loss): the inner CE is weighted up for late start epochs, "
            "down for early ones."
        ),
    )
    intermediate_loss: Literal["none", "constant", "adaptive"] = Field(
        "none",
        description=(
            "AST: also match the student at inner step (N // M) x i to expert epoch t + i, with weight 1 "
            "(constant, --agg_middle_loss) or i / M (adaptive); needs syn_steps >= expert_epochs."
        ),
    )
    weight_perturb: float = Field(
        0.0,
        ge=0,
        description=(
            "AST: scale s of a random perturbation of the student's starting conv weights (AST uses 1.0); 0 = off."
        ),
    )
    student_momentum: float = Field(
        0.0, ge=0, lt=1, description=("SGD momentum of the student's inner steps (AST: 0.9, like its experts; MTT: 0).")
    )
    # Follow-up switches (FOLLOW_UPS), all off by default; see the module docstring.
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "FTD/ATT: publish an exponential moving average of the images with this decay; 0 = the last iterate."
        ),
    )
    soft_labels: bool = Field(
        False,
        description=(
            "DATM: learn soft labels (logits) initialised from the experts' mean logits on the initial images."
        ),
    )
    lr_labels: float = Field(
        5.0,
        ge=0,
        description=(
            "DATM lr_y: SGD learning rate of the soft labels (5 at CIFAR-10 ipc 1, 2 at ipc 10); 0 = fixed soft labels."
        ),
    )
    momentum_labels: float = Field(0.9, ge=0, lt=1, description="DATM Momentum_y: SGD momentum of the soft labels.")
    label_epoch: int | None = Field(
        None, ge=0, description=("Expert snapshot (epoch) whose logits start the soft labels; empty = the last one.")
    )
    min_start_epoch: int = Field(0, ge=0, description="DATM: lower end of the start-epoch window.")
    initial_max_start_epoch: int | None = Field(
        None,
        ge=0,
        description=(
            "DATM sequential generation: the window's upper end grows linearly from this to max_start_epoch "
            "over window_growth iterations; empty = fixed at max_start_epoch."
        ),
    )
    window_growth: int = Field(
        1000, ge=1, description=("DATM expansion_end_epoch: iterations over which the start-epoch window grows.")
    )
    memory: str = Field(
        "unrolled",
        json_schema_extra=lambda s: s.update(enum=MEMORY_MODES.choices()),
        description=(
            "How the inner loop is backpropagated, all exact: unrolled = keep every step's graph (MTT), "
            "constant = one step's graph at a time (adjoint), budget = as many step graphs as fit in "
            "memory_budget_mb, recomputing the rest, auto = unrolled if all fit, else budget, else constant."
        ),
    )
    memory_budget_mb: float | None = Field(
        None,
        gt=0,
        description=(
            "MB of inner-step graphs to keep, for memory budget/auto (required there); empty for unrolled/constant."
        ),
    )
    fast_layers: bool = Field(
        True,
        description=(
            "Run the student's instance norm and avg pooling as their faster equivalents (same parameters, "
            "same values to rounding; distill.nets.FAST_EQUIVALENTS); false = the experts' own layers."
        ),
    )
    precision: Precision = Field(
        "fp32",
        description=(
            "Precision of the inner loop and both backward passes: fp32, tf32 (CUDA TF32 convolutions/matmuls) "
            "or bf16 autocast; images, lr and the student's parameters stay float32 (distill.precision)."
        ),
    )
    checkpoint_every: int = Field(
        50,
        ge=1,
        description=(
            "Iterations between checkpoints (written when a work_dir is given; a restarted run resumes from the last)."
        ),
    )
    on_divergence: Literal["stop", "rollback"] = Field(
        "stop",
        description=(
            "When the loss stops being finite or the lr positive: stop with an error, or roll back to the "
            "last checkpoint with the image lr multiplied by rollback_factor."
        ),
    )
    rollback_factor: float = Field(0.5, gt=0, lt=1, description="Image lr multiplier per rollback.")
    max_rollbacks: int = Field(3, ge=0, description="Rollbacks allowed before the run stops with an error after all.")
    seed: int = Field(
        0,
        description=("Seed of the image init, the expert/epoch draws, the batches, DSA and the weight perturbations."),
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, name: str) -> str:
        if name not in INITS:
            raise ValueError(f"unknown init {name!r}; valid: {', '.join(INITS)}")
        return name

    @field_validator("memory")
    @classmethod
    def _known_memory(cls, name: str) -> str:
        if name not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {name!r}; valid: {', '.join(MEMORY_MODES)}")
        return name

    @model_validator(mode="after")
    def _budget_fits_mode(self) -> MatchConfig:
        budgeted = self.memory in BUDGETED_MODES
        if budgeted and self.memory_budget_mb is None:
            raise ValueError(
                f"memory={self.memory!r} needs memory_budget_mb (MB of inner-step graphs to keep, e.g. 2000)"
            )
        if not budgeted and self.memory_budget_mb is not None:
            raise ValueError(
                f"memory_budget_mb applies to memory in {', '.join(map(repr, BUDGETED_MODES))}, not {self.memory!r}"
            )
        return self

    @model_validator(mode="after")
    def _window_is_ordered(self) -> MatchConfig:
        upper = self.max_start_epoch if self.initial_max_start_epoch is None else self.initial_max_start_epoch
        if not self.min_start_epoch <= upper <= self.max_start_epoch:
            raise ValueError(
                f"the start-epoch window needs min_start_epoch <= initial_max_start_epoch <= max_start_epoch; got "
                f"{self.min_start_epoch}, {self.initial_max_start_epoch}, {self.max_start_epoch}"
            )
        return self

    @model_validator(mode="after")
    def _intermediate_fits(self) -> MatchConfig:
        if self.intermediate_loss != "none" and self.syn_steps < self.expert_epochs:
            raise ValueError(
                f"intermediate_loss={self.intermediate_loss!r} matches at steps (syn_steps // expert_epochs) * i; "
                f"needs syn_steps >= expert_epochs, got {self.syn_steps} < {self.expert_epochs}"
            )
        return self

    def identity(self) -> dict:
        """What a run's result depends on: every field but how long it runs and how often it saves.

        iterations is left out, so a finished run can be extended by resuming with more; follow-up
        switches at their defaults are left out, so runs from before they existed still resume.
        """
        out = self.model_dump(mode="json", exclude={"iterations", "checkpoint_every"})
        for name in (*FOLLOW_UPS, *SPEED_OPTIONS):
            if out[name] == type(self).model_fields[name].default:
                del out[name]
        return out


# Options of how fast a run goes, not what it computes; left out of the identity at their defaults.
SPEED_OPTIONS = ("memory_budget_mb", "fast_layers", "precision")
BUDGETED_MODES = ("budget", "auto")  # memory modes sized by memory_budget_mb

FOLLOW_UPS = (
    "ema_decay",
    "soft_labels",
    "lr_labels",
    "momentum_labels",
    "label_epoch",
    "min_start_epoch",
    "initial_max_start_epoch",
    "window_growth",
)


# ---------------------------------------------------------------- checks (before any long computation)


# The one ipc rule (distill.data.check_ipc), raising MatchingError like every check here: each
# class needs ipc distinct real images to start from. check_ipc(class_counts, ipc, class_names).
check_ipc = functools.partial(data_check_ipc, error=MatchingError)


def check_experts(
    meta: dict,
    last_epoch: int,
    cfg: MatchConfig,
    *,
    num_classes: int,
    image_shape: tuple[int, int, int] | list[int],
    dataset_fingerprint: str | None = None,
    preprocessor_fingerprint: str | None = None,
    net: str | None = None,
    net_kwargs: dict | None = None,
) -> None:
    """Refuse an expert set made for another dataset, preprocessing (ZCA), model or length."""
    problems = []
    if dataset_fingerprint is not None and meta.get("dataset_fingerprint") != dataset_fingerprint:
        problems.append(
            f"it was trained on another dataset (fingerprint {meta.get('dataset_fingerprint')!r}, "
            f"this dataset is {dataset_fingerprint!r})"
        )
    if preprocessor_fingerprint is not None and meta.get("preprocessor_fingerprint") != preprocessor_fingerprint:
        problems.append(
            f"it was trained with another preprocessing, e.g. the other ZCA setting (fingerprint "
            f"{meta.get('preprocessor_fingerprint')!r}, this one is {preprocessor_fingerprint!r})"
        )
    if net is not None and (
        meta.get("net") != net or (net_kwargs is not None and meta.get("net_kwargs") != net_kwargs)
    ):
        problems.append(f"it is for model {meta.get('net')!r} {meta.get('net_kwargs')}, not {net!r} {net_kwargs}")
    channels, size = int(image_shape[0]), int(image_shape[-1])
    if (meta.get("num_classes"), meta.get("channels"), meta.get("image_size")) != (num_classes, channels, size):
        problems.append(
            f"it is for {meta.get('num_classes')} classes of {meta.get('channels')}x{meta.get('image_size')} px "
            f"images, the data has {num_classes} classes of {channels}x{size} px"
        )
    if problems:
        raise MatchingError("expert set refused: " + "; ".join(problems))
    if cfg.max_start_epoch + cfg.expert_epochs > last_epoch:
        raise MatchingError(
            f"max_start_epoch + expert_epochs = {cfg.max_start_epoch} + {cfg.expert_epochs} = "
            f"{cfg.max_start_epoch + cfg.expert_epochs} is beyond the stored trajectories (last epoch "
            f"{last_epoch}); lower them or train longer experts"
        )
    if cfg.soft_labels and cfg.label_epoch is not None and cfg.label_epoch > last_epoch:
        raise MatchingError(
            f"label_epoch {cfg.label_epoch} is beyond the stored trajectories (last epoch {last_epoch})"
        )


# ---------------------------------------------------------------- the student


class Student:
    """The expert's net evaluated at a flat parameter vector (differentiable w.r.t. it, twice)."""

    def __init__(self, meta: dict, device: torch.device, dtype: torch.dtype = torch.float32, fast: bool = True):
        # fast: layers swapped for their faster equivalents (distill.nets.FAST_EQUIVALENTS: the fused
        # instance norm, strided-add avg pooling), same parameters and values to rounding
        self.layout = layout_from_json(meta["layout"])
        kwargs = fast_net_kwargs(meta["net"], meta["net_kwargs"]) if fast else meta["net_kwargs"]
        net = create_net(
            meta["net"],
            num_classes=meta["num_classes"],
            channels=meta["channels"],
            image_size=meta["image_size"],
            **kwargs,
        )
        self.net = net.to(device=device, dtype=dtype)
        names = [name for name, _ in self.layout]
        if names != [name for name, _ in self.net.named_parameters()]:
            raise MatchingError(f"the expert layout does not match a fresh {meta['net']!r}; retrain the experts")
        # Buffers (BatchNorm running stats) are not in trajectories; the student keeps the fresh
        # net's, used in training mode, i.e. batch statistics, as the experts trained.
        self.buffers = dict(self.net.named_buffers())

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = unflatten_params(theta, self.layout)
        return torch.func.functional_call(self.net, {**params, **self.buffers}, (x,))


# ---------------------------------------------------------------- one iteration's problem


@dataclass
class Segment:
    """Everything one matching iteration needs, drawn up front so both memory modes replay it."""

    start: torch.Tensor  # theta_0 (perturbed when weight_perturb > 0); constant
    targets: list[tuple[int, torch.Tensor, float]]  # (inner step, expert snapshot, weight)
    plan: list[tuple[torch.Tensor, DSAParams | None]]  # per inner step: image indices, DSA draw
    scale: float = 1.0  # balanced-loss CE multiplier
    momentum: float = 0.0  # student momentum
    expert_id: int = 0
    start_epoch: int = 0


def _inner_grad(
    student: Student,
    theta: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    step: tuple[torch.Tensor, DSAParams | None],
    scale: float,
    create_graph: bool,
) -> torch.Tensor:
    idx, aug = step
    x = images[idx]
    if aug is not None:
        x = apply_params(x, aug)
    target = labels[idx]
    # float labels are soft-label logits (DATM): cross-entropy against their softmax
    ce = F.cross_entropy(student(theta, x), target.softmax(1) if target.is_floating_point() else target)
    (g,) = torch.autograd.grad(ce * scale if scale != 1.0 else ce, theta, create_graph=create_graph)
    return g


def _match_term(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (theta - target).pow(2).sum() / (start - target).pow(2).sum()


def _unrolled(
    student: Student, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, seg: Segment
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """MTT: keep every inner step's graph, backprop once through all of them."""
    weights = {step: (target, w) for step, target, w in seg.targets}
    theta = seg.start.detach().clone().requires_grad_(True)
    velocity, loss = None, torch.zeros((), dtype=theta.dtype, device=theta.device)
    for k, step in enumerate(seg.plan):
        g = _inner_grad(student, theta, images, labels, step, seg.scale, create_graph=True)
        velocity = g if velocity is None else seg.momentum * velocity + g
        theta = theta - lr * velocity
        if k + 1 in weights:
            target, w = weights[k + 1]
            loss = loss + w * _match_term(theta, seg.start, target)
    wrt = [images, lr] + ([labels] if labels.requires_grad else [])
    return (float(loss.detach()), *torch.autograd.grad(loss, wrt))


def _constant(
    student: Student, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, seg: Segment
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Exact adjoint of the inner loop, one step's graph at a time (see the module docstring)."""
    alpha, mu = lr.detach(), seg.momentum
    fixed, fixed_labels, learn_labels = images.detach(), labels.detach(), labels.requires_grad
    thetas = [seg.start.detach()]
    velocity = None
    for step in seg.plan:
        theta = thetas[-1].clone().requires_grad_(True)
        g = _inner_grad(student, theta, fixed, fixed_labels, step, seg.scale, create_graph=False)
        velocity = g if velocity is None else mu * velocity + g
        thetas.append((thetas[-1] - alpha * velocity).detach())
    loss = torch.zeros((), dtype=alpha.dtype, device=alpha.device)
    direct: dict[int, torch.Tensor] = {}
    for step_index, target, w in seg.targets:
        theta = thetas[step_index].clone().requires_grad_(True)
        term = w * _match_term(theta, seg.start, target)
        (direct[step_index],) = torch.autograd.grad(term, theta)
        loss = loss + term.detach()
    n = len(seg.plan)
    theta_bar = direct.get(n, torch.zeros_like(seg.start))
    u = torch.zeros_like(seg.start)
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros_like(alpha)
    grad_labels = torch.zeros_like(labels) if learn_labels else None
    for k in reversed(range(n)):
        u = theta_bar + mu * u
        theta = thetas[k].clone().requires_grad_(True)
        g = _inner_grad(student, theta, images, labels, seg.plan[k], seg.scale, create_graph=True)
        hv_theta, hv_images, *hv_labels = torch.autograd.grad(
            g, [theta, images] + ([labels] if learn_labels else []), grad_outputs=-alpha * u
        )
        grad_lr = grad_lr - (g.detach() * u).sum()
        grad_images = grad_images + hv_images
        if learn_labels:
            grad_labels = grad_labels + hv_labels[0]
        theta_bar = theta_bar + hv_theta
        if k in direct and k > 0:
            theta_bar = theta_bar + direct[k]
        del g, hv_theta, hv_images, hv_labels
    return (float(loss), grad_images, grad_lr.reshape(lr.shape)) + ((grad_labels,) if learn_labels else ())


def _segmented(
    student: Student, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, seg: Segment, keep: int
) -> tuple:
    """Checkpointed unrolling: graphs of at most `keep` inner steps at a time, each step computed at most twice.

    A forward pass without graphs stores (theta, velocity) at the start of every segment of `keep`
    steps, counted back from the end, up to the last segment, which is then run with its graph
    (no recomputation). Going back, each earlier segment is recomputed from its checkpoint with its
    graph and backpropagated with the adjoints of its end state (theta, velocity) carried from the
    segment after it. Same operations as `_unrolled`, so the gradients agree to rounding; extra cost:
    n - keep inner steps without graph (forward and first backward only).
    """
    n, mu = len(seg.plan), seg.momentum
    keep = max(1, min(keep, n))
    weights = {step: (target, w) for step, target, w in seg.targets}
    starts = list(range(n - keep, 0, -keep))[::-1]
    starts = ([0] if not starts or starts[0] != 0 else []) + starts
    alpha, fixed, fixed_labels = lr.detach(), images.detach(), labels.detach()
    checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    theta, velocity = seg.start.detach(), None
    for k in range(starts[-1]):
        if k in starts:
            checkpoints[k] = (theta, velocity)
        leaf = theta.clone().requires_grad_(True)
        g = _inner_grad(student, leaf, fixed, fixed_labels, seg.plan[k], seg.scale, create_graph=False)
        velocity = g if velocity is None else mu * velocity + g
        theta = (theta - alpha * velocity).detach()
    checkpoints[starts[-1]] = (theta, velocity)
    learn_labels = labels.requires_grad
    wrt = [images, lr] + ([labels] if learn_labels else [])
    totals = [torch.zeros_like(t) for t in wrt]
    theta_bar = velocity_bar = None
    loss_value = torch.zeros((), dtype=alpha.dtype, device=alpha.device)  # read once at the end: no sync per segment
    for begin, end in reversed(list(zip(starts, starts[1:] + [n]))):
        theta0, velocity0 = checkpoints[begin]
        theta = theta0.clone().requires_grad_(True)
        velocity = velocity0.clone().requires_grad_(True) if velocity0 is not None else None
        leaves = [theta] + ([velocity] if velocity is not None else [])
        loss = None
        for k in range(begin, end):
            g = _inner_grad(student, theta, images, labels, seg.plan[k], seg.scale, create_graph=True)
            velocity_k = g if velocity is None else mu * velocity + g
            theta = theta - lr * velocity_k
            velocity = velocity_k
            if k + 1 in weights:
                target, w = weights[k + 1]
                term = w * _match_term(theta, seg.start, target)
                loss = term if loss is None else loss + term
        outputs, grad_outputs = [], []
        if loss is not None:
            outputs.append(loss)
            grad_outputs.append(torch.ones_like(loss))
            loss_value = loss_value + loss.detach()
        if theta_bar is not None:
            outputs.append(theta)
            grad_outputs.append(theta_bar)
        if velocity_bar is not None:
            outputs.append(velocity)
            grad_outputs.append(velocity_bar)
        grads = torch.autograd.grad(outputs, leaves + wrt, grad_outputs, allow_unused=True, materialize_grads=True)
        theta_bar = grads[0]
        velocity_bar = grads[1] if len(leaves) > 1 else None
        totals = [t + d for t, d in zip(totals, grads[len(leaves) :])]
        del outputs, grad_outputs, grads, g, theta, velocity, leaves
    return (float(loss_value), totals[0], totals[1]) + ((totals[2],) if learn_labels else ())


# Graph memory of one inner step, per student and batch layout (measured once, see step_graph_mb).
_STEP_MB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_graph_mb(
    student: Student, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, seg: Segment
) -> float:
    """MB autograd keeps for one inner step (forward, create_graph backward, update), measured on
    the segment's first step once per student and batch layout (distill.graph_memory)."""
    idx, aug = seg.plan[0]
    key = (
        tuple(images.shape),
        len(idx),
        aug is not None,
        images.dtype,
        str(images.device),
        labels.requires_grad,
        tuple(labels.shape),
    )
    cache = _STEP_MB.setdefault(student, {})
    if key not in cache:
        with GraphMemoryMeter() as meter:
            theta = seg.start.detach().clone().requires_grad_(True)
            g = _inner_grad(student, theta, images, labels, seg.plan[0], seg.scale, create_graph=True)
            step = theta - lr * g
        del g, step, theta
        cache[key] = max(meter.peak_mb, 1e-6)
    return cache[key]


def _budget(
    student: Student, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, seg: Segment, budget_mb: float
) -> tuple:
    """Keep as many inner-step graphs as fit in budget_mb (at least one), recompute the rest (_segmented)."""
    keep = int(budget_mb // step_graph_mb(student, images, labels, lr, seg))
    return _segmented(student, images, labels, lr, seg, keep=max(1, keep))


def _auto(
    student: Student, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, seg: Segment, budget_mb: float
) -> tuple:
    """unrolled if every step's graph fits in budget_mb, budget if one does, else constant."""
    per_step = step_graph_mb(student, images, labels, lr, seg)
    if per_step * len(seg.plan) <= budget_mb:
        return _unrolled(student, images, labels, lr, seg)
    if per_step <= budget_mb:
        return _segmented(student, images, labels, lr, seg, keep=int(budget_mb // per_step))
    return _constant(student, images, labels, lr, seg)


# name -> fn(student, images (leaf, requires grad), labels, lr (leaf), segment[, budget_mb]) -> (loss, d images, d lr)
# (budget_mb only for BUDGETED_MODES)
MEMORY_MODES: Registry[Callable[..., tuple[float, torch.Tensor, torch.Tensor]]] = Registry(
    "memory mode",
    {
        "unrolled": _unrolled,
        "constant": _constant,
        "budget": _budget,
        "auto": _auto,
    },
)


def matching_grad(
    mode: str,
    student: Student,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    seg: Segment,
    learn_labels: bool = False,
    memory_budget_mb: float | None = None,
) -> tuple:
    """The matching loss and its gradients w.r.t. the images and the lr, in a MEMORY_MODES mode.

    labels: int class labels [N], or soft-label logits [N, K] (float); with learn_labels (float
    labels only) a fourth element follows: the gradient w.r.t. the logits.
    memory_budget_mb: MB of inner-step graphs the BUDGETED_MODES may keep (required by them).
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {mode!r}; valid: {', '.join(MEMORY_MODES)}")
    if mode in BUDGETED_MODES and (memory_budget_mb is None or memory_budget_mb <= 0):
        raise ValueError(f"memory mode {mode!r} needs a positive memory_budget_mb; got {memory_budget_mb}")
    if learn_labels and not labels.is_floating_point():
        raise ValueError("learn_labels needs soft-label logits [N, K] (float), not class indices")
    images = images.detach().requires_grad_(True)
    lr = lr.detach().requires_grad_(True)
    labels = labels.detach().requires_grad_(True) if learn_labels else labels.detach()
    extra = {"budget_mb": memory_budget_mb} if mode in BUDGETED_MODES else {}
    return MEMORY_MODES[mode](student, images, labels, lr, seg, **extra)


def start_window(cfg: MatchConfig, iteration: int) -> tuple[int, int]:
    """The start epochs drawn at `iteration` (1-based), both ends inclusive (DATM's window)."""
    upper = cfg.max_start_epoch
    if cfg.initial_max_start_epoch is not None:
        grown = (cfg.max_start_epoch - cfg.initial_max_start_epoch) * (iteration - 1) // cfg.window_growth
        upper = min(cfg.initial_max_start_epoch + grown, cfg.max_start_epoch)
    return cfg.min_start_epoch, upper


def balance_scale(start_epoch: int, max_start_epoch: int) -> float:
    """AST's balanced inner loss: CE x log5(t - h + 8) if t >= h, else / log5(h - t + 8); h = T+ // 2."""
    h = max_start_epoch // 2
    if start_epoch >= h:
        return math.log(start_epoch - h + 8, 5)
    return 1.0 / math.log(h - start_epoch + 8, 5)


def _perturb(theta: torch.Tensor, layout: list, scale: float, generator: torch.Generator) -> torch.Tensor:
    """AST: every 4-D (conv) weight w <- w + scale * d * w, d ~ N(0, I) with ||d||_F = 1."""
    pieces, offset = [], 0
    for _, shape in layout:
        size = math.prod(shape)
        w = theta[offset : offset + size]
        if len(shape) == 4:
            d = torch.randn(size, generator=generator, dtype=torch.float64)
            d = (d / d.norm()).to(theta.dtype).to(theta.device)
            w = w + scale * d * w
        pieces.append(w)
        offset += size
    return torch.cat(pieces)


def sample_segment(
    cfg: MatchConfig,
    experts: TrajectorySet,
    n_images: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    iteration: int = 1,
) -> Segment:
    """Draw one iteration: expert, start epoch, targets, perturbation, batches and DSA parameters."""
    low, high = start_window(cfg, iteration)
    # Same draws as TrajectorySet.random_segment (expert, then epoch), shifted by the window's low end.
    i = int(torch.randint(len(experts), (), generator=generator))
    start_epoch = low + int(torch.randint(high - low + 1, (), generator=generator))
    reader, expert_id = experts.reader(i), experts.expert_ids[i]
    start, target = reader.snapshot(start_epoch), reader.snapshot(start_epoch + cfg.expert_epochs)
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    start, target = move(start), move(target)
    n, m = cfg.syn_steps, cfg.expert_epochs
    targets = [(n, target, 1.0)]
    if cfg.intermediate_loss != "none":
        for i in range(1, m):
            weight = 1.0 if cfg.intermediate_loss == "constant" else i / m
            targets.append(((n // m) * i, move(reader.snapshot(start_epoch + i)), weight))
    if cfg.weight_perturb > 0:
        start = _perturb(start, layout_from_json(experts.meta["layout"]), cfg.weight_perturb, generator)
    batch = min(cfg.batch_syn or n_images, n_images)
    plan, chunks = [], []
    for _ in range(n):
        if not chunks:
            chunks = list(torch.randperm(n_images, generator=generator).split(batch))
        idx = chunks.pop(0)
        aug = sample_params(len(idx), cfg.dsa, generator).to(device) if cfg.dsa is not None else None
        plan.append((idx.to(device), aug))
    scale = balance_scale(start_epoch, cfg.max_start_epoch) if cfg.balance_loss else 1.0
    return Segment(
        start, sorted(targets, key=lambda t: t[0]), plan, scale, cfg.student_momentum, expert_id, start_epoch
    )


# ---------------------------------------------------------------- initialization


def _class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def _init_real(cfg, experts, x, y, num_classes, generator, device) -> torch.Tensor:
    """MTT pix_init real: ipc random real images of each class."""
    picks = [idx[torch.randperm(len(idx), generator=generator)[: cfg.ipc]] for idx in _class_indices(y, num_classes)]
    return x[torch.cat(picks)].clone()


def _init_noise(cfg, experts, x, y, num_classes, generator, device) -> torch.Tensor:
    """MTT pix_init noise: standard normal pixels (in model input space)."""
    return torch.randn(num_classes * cfg.ipc, *x.shape[1:], generator=generator)


@torch.no_grad()
def _init_representative(cfg, experts, x, y, num_classes, generator, device) -> torch.Tensor:
    """AST pix_init avg: per class, K-means (k = ipc) on a trained expert's logits; the real image
    nearest each centre. k = ipc (AST fixes 10 clusters and takes ipc // 10 per cluster, which is
    empty at ipc 1); with k = 1 it is the image whose logits are closest to the class mean."""
    from sklearn.cluster import KMeans  # deferred: ~1 s import only this init needs

    i = int(torch.randint(len(experts), (), generator=generator))
    reader = experts.reader(i)
    student = Student(experts.meta, device)
    theta = reader.snapshot(reader.last_epoch).to(device)
    picks = []
    for idx in _class_indices(y, num_classes):
        logits = torch.cat([student(theta, x[b].to(device)).cpu() for b in idx.split(1024)]).double()
        km = KMeans(n_clusters=cfg.ipc, n_init=10, random_state=cfg.seed).fit(logits.numpy())
        centres = torch.from_numpy(km.cluster_centers_)
        dist = torch.cdist(centres, logits)
        chosen: list[int] = []
        for row in dist:
            order = torch.argsort(row)
            chosen.append(int(next(j for j in order.tolist() if j not in chosen)))
        picks.append(idx[torch.tensor(chosen)])
    return x[torch.cat(picks)].clone()


# name -> fn(cfg, experts, train_x, train_y, num_classes, generator, device) -> images [C*ipc, ...] class-major
INITS: Registry[Callable[..., torch.Tensor]] = Registry(
    "init",
    {
        "real": _init_real,
        "noise": _init_noise,
        "representative": _init_representative,
    },
)


# ---------------------------------------------------------------- state and checkpoints


@dataclass
class _State:
    iteration: int
    images: torch.Tensor
    lr: torch.Tensor  # 0-d
    buf_images: torch.Tensor
    buf_lr: torch.Tensor
    rng: torch.Tensor  # CPU generator state
    lr_img: float
    rollbacks: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    start_epochs: list[int] = field(default_factory=list)
    # follow-up state: "ema" (image EMA accumulator), "labels" / "buf_labels" (soft-label logits, momentum)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def copy(self) -> _State:
        return replace(
            self,
            images=self.images.clone(),
            lr=self.lr.clone(),
            buf_images=self.buf_images.clone(),
            buf_lr=self.buf_lr.clone(),
            rng=self.rng.clone(),
            losses=list(self.losses),
            lrs=list(self.lrs),
            start_epochs=list(self.start_epochs),
            extra={k: v.clone() for k, v in self.extra.items()},
        )


class _Checkpoint:
    """A distill.checkpoint commit in <work_dir>/ckpt: step = iteration; tensors: images, lr, both momentum
    buffers, the generator; record: current image lr, rollbacks and the curves so far."""

    def __init__(self, directory: str | Path, identity: dict):
        self.state = Checkpoint(Path(directory) / "ckpt", identity, kind="matching")

    def save(self, state: _State) -> None:
        tensors = {
            "images": state.images,
            "lr": state.lr.reshape(1),
            "buf_images": state.buf_images,
            "buf_lr": state.buf_lr.reshape(1),
            "rng": state.rng,
            **{f"extra.{k}": v for k, v in state.extra.items()},
        }
        self.state.save(
            state.iteration,
            tensors,
            {
                "lr_img": state.lr_img,
                "rollbacks": state.rollbacks,
                "losses": state.losses,
                "lrs": state.lrs,
                "start_epochs": state.start_epochs,
            },
        )

    def restore(self, device: torch.device, dtype: torch.dtype) -> _State | None:
        try:
            saved = self.state.load()
        except CheckpointError as e:
            raise MatchingError(f"{e} (matching work_dir)") from e
        if saved is None:
            return None
        t, r = saved.tensors, saved.record
        dev = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
        return _State(
            saved.step,
            dev(t["images"]),
            dev(t["lr"]).reshape(()),
            dev(t["buf_images"]),
            dev(t["buf_lr"]).reshape(()),
            t["rng"],
            r["lr_img"],
            r["rollbacks"],
            r["losses"],
            r["lrs"],
            r["start_epochs"],
            {k.removeprefix("extra."): dev(v) for k, v in t.items() if k.startswith("extra.")},
        )


# ---------------------------------------------------------------- the loop


@dataclass
class MatchResult:
    images: torch.Tensor  # float32 [num_classes * ipc, C, H, W], model input space, class-major
    labels: torch.Tensor  # int64, class-major: [0]*ipc + [1]*ipc + ...
    lr: float  # the learned student lr: train on the images with it
    losses: list[float]  # matching loss per iteration
    lrs: list[float]  # learned lr after each iteration
    start_epochs: list[int]  # expert start epoch drawn per iteration
    seconds: float
    resumed_from: int | None
    rollbacks: int
    init_images: torch.Tensor | None = None  # the starting images (None when resumed)
    soft_labels: torch.Tensor | None = None  # float32 logits [num_classes * ipc, num_classes] (soft_labels)
    last_images: torch.Tensor | None = None  # the last iterate when `images` is the EMA (ema_decay > 0)


def match_trajectories(
    cfg: MatchConfig,
    experts: TrajectorySet,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    num_classes: int,
    work_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    dataset_fingerprint: str | None = None,
    preprocessor_fingerprint: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> MatchResult:
    """Distill (train_x, train_y) into cfg.ipc images per class by matching `experts`' trajectories.

    train_x: float images in model input space (normalized or ZCA'd, as the experts saw them).
    work_dir: where checkpoints go; a run restarted with the same arguments resumes there.
    progress(iteration, iterations, loss=, lr=, start_epoch=, expert=, lr_img=) after every
    iteration (after its checkpoint, when one is due).
    Raises MatchingError on bad inputs (before any distillation) and MatchingDiverged when the
    loss or lr goes bad and on_divergence="stop" (or the rollbacks are used up).
    """
    t0 = time.perf_counter()
    if train_x.dim() != 4 or train_x.shape[0] != train_y.shape[0]:
        raise MatchingError(
            f"need images [N, C, H, W] and N labels; got {tuple(train_x.shape)}, {tuple(train_y.shape)}"
        )
    counts = torch.bincount(train_y.long(), minlength=num_classes).tolist()
    if len(counts) > num_classes:
        raise MatchingError(f"labels go up to {len(counts) - 1} but num_classes is {num_classes}")
    check_ipc(counts, cfg.ipc)
    check_experts(
        experts.meta,
        experts.last_epoch,
        cfg,
        num_classes=num_classes,
        image_shape=tuple(train_x.shape[1:]),
        dataset_fingerprint=dataset_fingerprint,
        preprocessor_fingerprint=preprocessor_fingerprint,
    )
    dev = resolve_device(device)
    keep_freed_memory()  # CPU: reuse freed graphs instead of page-faulting new ones (distill.allocator)
    student = Student(experts.meta, dev, dtype, fast=cfg.fast_layers)
    labels = torch.arange(num_classes).repeat_interleave(cfg.ipc).to(dev)
    identity = {
        "config": cfg.identity(),
        "experts": {
            "ids": experts.expert_ids,
            "layout": experts.meta["layout"],
            "recipe": experts.meta.get("recipe"),
            "dataset": experts.meta.get("dataset_fingerprint"),
        },
        "data": dataset_fingerprint or tensor_digest(train_x, train_y),
        "dtype": str(dtype),
    }
    checkpoint = _Checkpoint(work_dir, json.loads(json.dumps(identity))) if work_dir is not None else None
    state = checkpoint.restore(dev, dtype) if checkpoint else None
    resumed_from = state.iteration if state else None
    init_images = None
    if state is None:
        generator = torch.Generator().manual_seed(cfg.seed)
        images = INITS[cfg.init](cfg, experts, train_x, train_y.long(), num_classes, generator, dev)
        images = images.to(device=dev, dtype=dtype)
        init_images = images.detach().cpu().float().clone()
        lr = torch.tensor(cfg.lr_init, device=dev, dtype=dtype)
        state = _State(0, images, lr, torch.zeros_like(images), torch.zeros_like(lr), generator.get_state(), cfg.lr_img)
        if cfg.soft_labels:
            soft = initial_soft_labels(cfg, experts, images, dev, dtype)
            state.extra.update(labels=soft, buf_labels=torch.zeros_like(soft))
        if cfg.ema_decay > 0:
            state.extra["ema"] = torch.zeros_like(images)
        if checkpoint:
            checkpoint.save(state)
    last_good = state.copy()
    generator = torch.Generator()
    generator.set_state(state.rng)
    # The loss and gradient can stay finite while one huge image step throws the pixels far out of
    # the input space (lr_img 1e38 gave pixels of 1e36 and a finite loss); the same bound that
    # publishing applies is checked on every update, so such a step is caught where it happens.
    pixel_limit = MAX_PIXEL_RANGE_FACTOR * max(float(train_x.abs().max()), 1e-6)

    while state.iteration < cfg.iterations:
        it = state.iteration + 1
        seg = sample_segment(cfg, experts, len(state.images), generator, dev, dtype, iteration=it)
        learn_labels = cfg.soft_labels and cfg.lr_labels > 0
        with precision_context(cfg.precision, dev):
            loss, g_images, g_lr, *g_labels = matching_grad(
                cfg.memory,
                student,
                state.images,
                state.extra.get("labels", labels),
                state.lr,
                seg,
                learn_labels,
                cfg.memory_budget_mb,
            )
        with torch.no_grad():
            buf_images = cfg.momentum_img * state.buf_images + g_images
            buf_lr = cfg.momentum_lr * state.buf_lr + g_lr
            images = state.images - state.lr_img * buf_images
            lr = state.lr - cfg.lr_lr * buf_lr
            extra = dict(state.extra)
            if learn_labels:
                extra["buf_labels"] = cfg.momentum_labels * state.extra["buf_labels"] + g_labels[0]
                extra["labels"] = state.extra["labels"] - cfg.lr_labels * extra["buf_labels"]
            if cfg.ema_decay > 0:
                extra["ema"] = cfg.ema_decay * state.extra["ema"] + (1 - cfg.ema_decay) * images
        problem = (
            _divergence(loss, g_images, float(lr))
            or _exploded(images, pixel_limit)
            or (
                "the soft labels have non-finite values"
                if learn_labels and not bool(torch.isfinite(extra["labels"]).all())
                else None
            )
        )
        if problem:
            if cfg.on_divergence == "stop" or state.rollbacks >= cfg.max_rollbacks:
                tried = f" after {state.rollbacks} rollback(s)" if cfg.on_divergence == "rollback" else ""
                raise MatchingDiverged(
                    f"trajectory matching diverged at iteration {it}/{cfg.iterations}{tried}: {problem} "
                    f"(image lr {state.lr_img:g}, lr_lr {cfg.lr_lr:g}, expert {seg.expert_id}, start epoch "
                    f"{seg.start_epoch}); lower lr_img or lr_lr, or set on_divergence='rollback'"
                )
            rollbacks, lr_img = state.rollbacks + 1, state.lr_img * cfg.rollback_factor
            state = replace(last_good.copy(), rollbacks=rollbacks, lr_img=lr_img)
            generator.set_state(state.rng)
            continue
        state.images, state.lr, state.buf_images, state.buf_lr, state.extra = images, lr, buf_images, buf_lr, extra
        state.iteration = it
        state.losses.append(loss)
        state.lrs.append(float(lr))
        state.start_epochs.append(seg.start_epoch)
        state.rng = generator.get_state()
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            if checkpoint:
                checkpoint.save(state)
            last_good = state.copy()
        if progress is not None:
            progress(
                it,
                cfg.iterations,
                loss=loss,
                lr=float(lr),
                start_epoch=seg.start_epoch,
                expert=seg.expert_id,
                lr_img=state.lr_img,
            )

    published, last_images = state.images, None
    if cfg.ema_decay > 0 and state.iteration > 0:
        # bias-corrected: the accumulator starts at 0, so the initial images carry no weight
        published = state.extra["ema"] / (1 - cfg.ema_decay**state.iteration)
        last_images = state.images.detach().cpu().float()
    soft_labels = state.extra["labels"].detach().cpu().float() if "labels" in state.extra else None
    return MatchResult(
        images=published.detach().cpu().float(),
        labels=labels.cpu(),
        lr=float(state.lr),
        losses=state.losses,
        lrs=state.lrs,
        start_epochs=state.start_epochs,
        seconds=time.perf_counter() - t0,
        resumed_from=resumed_from,
        rollbacks=state.rollbacks,
        init_images=init_images,
        soft_labels=soft_labels,
        last_images=last_images,
    )


@torch.no_grad()
def expert_logits(
    experts: TrajectorySet,
    images: torch.Tensor,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    epoch: int | None = None,
) -> torch.Tensor:
    """The experts' logits on `images` (model input space), averaged over the experts, each at
    snapshot `epoch` (None: its last): soft labels as DATM and DD-Ranking's soft-label baseline make them."""
    dev = resolve_device(device)
    student = Student(experts.meta, dev, dtype)
    images = images.to(device=dev, dtype=dtype)
    logits = []
    for i in range(len(experts)):
        reader = experts.reader(i)
        theta = reader.snapshot(reader.last_epoch if epoch is None else epoch)
        theta = theta.to(device=dev, dtype=dtype)
        logits.append(torch.cat([student(theta, batch) for batch in images.split(256)]))
    return torch.stack(logits).mean(0)


def initial_soft_labels(
    cfg: MatchConfig,
    experts: TrajectorySet,
    images: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DATM: the soft labels start as the experts' logits on the initial images, averaged over the
    experts, each at snapshot label_epoch (None: its last)."""
    return expert_logits(experts, images, device, dtype, cfg.label_epoch)


def _exploded(images: torch.Tensor, limit: float) -> str | None:
    if not bool(torch.isfinite(images).all()):
        return "the updated images have non-finite values"
    peak = float(images.abs().max())
    if peak > limit:
        return (
            f"the updated images reach {peak:.3g}, over {MAX_PIXEL_RANGE_FACTOR:g}x the largest real input "
            f"value ({limit / MAX_PIXEL_RANGE_FACTOR:.3g})"
        )
    return None


def _divergence(loss: float, g_images: torch.Tensor, lr: float) -> str | None:
    if not math.isfinite(loss):
        return f"the matching loss is {loss}"
    if not bool(torch.isfinite(g_images).all()):
        return "the image gradient has non-finite values"
    if not math.isfinite(lr) or lr <= 0:
        return f"the learned student lr became {lr:g} (must stay positive)"
    return None

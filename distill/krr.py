"""KRR-ST: "Self-Supervised Dataset Distillation for Transfer Learning" (Lee et al., ICLR 2024).

An unlabelled source is distilled into n synthetic images X_s with learned target
representations Y_s, such that a network pretrained to regress Y_s from X_s transfers like one
trained with the self-supervised teacher (distill.ssl). As the reference code does
(`db-Lee/selfsup_dd`), with its bugs fixed on purpose:

  init        X_s = n random source images (seeded), Y_s = teacher.embed(X_s); both learnable.
  pool        M models of `net`, each trained online by full-batch SGD with MSE on (X_s, Y_s).
              Ages are staggered (model i starts at i*T/M of its budget T) and a model that
              reaches T steps is re-initialized *and its age reset to 0* (the reference never
              resets the counter, so after a few thousand steps its "trained pool" is a pool of
              fresh random nets). POOL_MODES: "online" (trained pool, FRePo's
              scheme) or "random-features" (a fresh random net every step: what the reference
              effectively runs, and RFAD's idea), an ablation.
  outer step  pick a pool model (eval mode), draw an augmented real batch X_r (flip + crop),
              Y_r = teacher.embed(X_r); with bias-augmented features F = [embed(x), 1]:
                  K_ss = F_s F_s^T,  K_rs = F_r F_s^T,  lambda = ridge * trace(K_ss)  (detached)
                  pred = K_rs (K_ss + lambda I)^-1 Y_s
              loss = MSE(pred, Y_r), gradients to X_s and Y_s only (the pool model is a fixed
              feature map), AdamW with linear lr decay; then the chosen model trains one step.

Input space: X_s, like every real batch and the teacher's inputs, is in the *model input
space*, i.e. after distill.transforms.Preprocessor (per-channel normalization, plus ZCA when
the preprocessor has it). The reference optimizes X_s in raw [0, 1] space and feeds it to the
nets unnormalized; here the same tensor goes into the pool models, the
pretraining of students and the stored `pixels`, so there is no second convention.

The bias column makes trace(K_ss) >= n > 0, so lambda > 0 and (K_ss + lambda I) is positive
definite even when K_ss is singular (duplicate images, a dead feature map); the solve runs in
float64.

Distillation checkpoints every `checkpoint_every` steps (X_s, Y_s, AdamW, pool models and
their optimizers, ages, the generator) and resumes bit-identically; a finished run keeps its
final checkpoint so a retry returns at once. Also here: the METHODS registry of the transfer
comparison (KRR-ST and its baselines) and what each pretrains on; pretraining, linear probe
and fine-tune are the shared recipe of distill.transfer. Pure: imports neither prefect nor ray.

    python -c "from distill.krr import KRRConfig, METHODS; print(KRRConfig(), list(METHODS))"
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from distill.augment import AUGMENTS, AugmentName
from distill.checkpoint import (
    Checkpoint,
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
)
from distill.nets import NetFields, NetName, create_net
from distill.registry import Registry
from distill.train import TrainConfig
from distill.transfer import TransferConfig, pretrain, transfer  # noqa: F401  (transfer: re-exported)
from distill.utils import Progress, derive_seed, resolve_device

# ---------------------------------------------------------------- config

# name -> pool class (registered below): how KRR-ST's feature maps are drawn every outer step
POOL_MODES: Registry[type] = Registry("pool_mode")
PoolMode = POOL_MODES.name_type()


class KRRConfig(NetFields, frozen=True, extra="forbid"):
    """KRR-ST distillation. Defaults: a CPU-feasible setting (the paper's values in the comments)."""

    num_images: int = Field(
        100, ge=1, description=("Synthetic images to distill; the paper uses 2% of the source (1000 for CIFAR-100).")
    )
    net: NetName = Field(
        "convnet_bn",
        description=(
            "Net of the model pool whose features the KRR solve uses (KRR-ST's ConvNet with batch norm; "
            "the transfer students default to the same net)."
        ),
    )
    net_kwargs: dict[str, Any] = Field(
        {},
        description=("Options of the pool net; convnet_bn defaults to widths 32-64-128 (paper: 128-256-512 at 32 px)."),
    )
    pool_mode: PoolMode = Field(
        "online",
        description=(
            "How the feature maps are drawn each outer step: online = a pool of models trained on the "
            "synthetic set (KRR-ST, FRePo's scheme); random-features = a fresh random net every step (an ablation)."
        ),
    )
    num_models: int = Field(4, ge=1, description="Pool size M (paper: 10).")
    online_iterations: int = Field(
        100, ge=1, description=("T: steps a pool model trains before it is reset to a fresh net (paper: 1000).")
    )
    online_lr: float = Field(0.1, gt=0, description="Pool models' full-batch SGD learning rate (paper: 0.1).")
    online_momentum: float = Field(0.9, ge=0, lt=1, description="Pool models' SGD momentum (paper: 0.9).")
    online_weight_decay: float = Field(1e-3, ge=0, description="Pool models' SGD weight decay (paper: 1e-3).")
    # 160,000 paper-size steps are infeasible on a CPU: 14.6 s per step
    outer_steps: int = Field(1000, ge=1, description="Distillation (outer) steps (paper: 160,000).")
    outer_lr: float = Field(
        1e-3,
        gt=0,
        description=(
            "AdamW learning rate of the synthetic images and targets (paper: 1e-4 CIFAR-100, "
            "1e-5 Tiny-ImageNet, over 160k steps)."
        ),
    )
    lr_end_factor: float = Field(
        0.1,
        gt=0,
        le=1,
        description=("The outer lr decays linearly to outer_lr x this at the last step (paper: 1e-3 over 160k)."),
    )
    learn_targets: bool = Field(
        True,
        description=(
            "Learn the target representations Y_s too (paper: yes); false keeps the teacher's representations."
        ),
    )
    real_batch: int = Field(256, ge=1, description="Augmented real images per outer step (paper: 1024).")
    ridge: float = Field(
        1e-6, gt=0, description=("KRR regularization: lambda = ridge x trace(K_ss), the paper's rule.")
    )
    augment: AugmentName = Field("flip_crop", description=("Augmentation of the real batches (paper: crop + flip)."))
    grad_clip: float = Field(0.0, ge=0, description=("Max gradient norm of (X_s, Y_s); 0 = off (the paper's default)."))
    checkpoint_every: int = Field(50, ge=1, description="Outer steps between checkpoints (resume points).")
    seed: int = Field(0, description="Seed of the initial images, pool inits, batches and augmentation.")


# ---------------------------------------------------------------- the KRR solve


def with_bias(features: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D + 1] with a column of ones: the KRR model gets an intercept."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def krr_predict(f_syn: torch.Tensor, f_real: torch.Tensor, y_syn: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Kernel ridge regression of y_syn on f_syn, evaluated at f_real: K_rs (K_ss + lambda I)^-1 y_syn.

    f_syn [n, D], f_real [m, D] are features *including* the bias column (see with_bias);
    lambda = ridge * trace(K_ss), detached. Solved in float64; differentiable w.r.t. f_syn,
    f_real and y_syn. Returns [m, K] in y_syn's dtype.
    """
    if f_syn.dim() != 2 or f_real.dim() != 2 or f_syn.shape[1] != f_real.shape[1]:
        raise ValueError(f"features must be [n, D] and [m, D]; got {tuple(f_syn.shape)} and {tuple(f_real.shape)}")
    if y_syn.shape[0] != f_syn.shape[0]:
        raise ValueError(f"{f_syn.shape[0]} synthetic features but {y_syn.shape[0]} targets")
    fs, fr, ys = f_syn.double(), f_real.double(), y_syn.double()
    k_ss = fs @ fs.T
    k_rs = fr @ fs.T
    lam = ridge * torch.trace(k_ss).detach()
    eye = torch.eye(k_ss.shape[0], dtype=k_ss.dtype, device=k_ss.device)
    alpha = torch.linalg.solve(k_ss + lam * eye, ys)
    return (k_rs @ alpha).to(y_syn.dtype)


# ---------------------------------------------------------------- model pools


NetFactory = Callable[[int], nn.Module]  # seed -> a fresh net on the right device


@POOL_MODES.register("online")
class OnlinePool:
    """M models trained online on (X_s, Y_s): staggered ages, reset to a fresh net (age 0) after T steps."""

    def __init__(self, cfg: KRRConfig, make_net: NetFactory, x: torch.Tensor, y: torch.Tensor):
        self.cfg, self.make_net = cfg, make_net
        self.ages = [0] * cfg.num_models
        self.generations = [0] * cfg.num_models  # how often each slot was reset: seeds its next init
        self.models: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        for i in range(cfg.num_models):
            self._fresh(i)
            # Staggered ages (FRePo): slot i starts i/M of the way through its budget, so the
            # pool always holds nets at every stage of training, and resets are spread out.
            for _ in range(i * cfg.online_iterations // cfg.num_models):
                self._train_step(i, x, y)
            self.ages[i] = i * cfg.online_iterations // cfg.num_models

    @property
    def resets(self) -> list[int]:
        return list(self.generations)

    def _fresh(self, i: int) -> None:
        net = self.make_net(derive_seed(self.cfg.seed, "pool", i, self.generations[i]))
        opt = torch.optim.SGD(
            net.parameters(),
            lr=self.cfg.online_lr,
            momentum=self.cfg.online_momentum,
            weight_decay=self.cfg.online_weight_decay,
        )
        if i < len(self.models):
            self.models[i], self.optimizers[i] = net, opt
        else:
            self.models.append(net)
            self.optimizers.append(opt)

    def _train_step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        net, opt = self.models[i], self.optimizers[i]
        net.train()
        loss = F.mse_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def select(self, generator: torch.Generator) -> int:
        return int(torch.randint(self.cfg.num_models, (1,), generator=generator))

    def model(self, i: int) -> nn.Module:
        return self.models[i]

    def update(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One more online step for model i on the current set; a fresh net (age 0) once its budget is spent."""
        self._train_step(i, x, y)
        self.ages[i] += 1
        if self.ages[i] >= self.cfg.online_iterations:
            self.generations[i] += 1
            self._fresh(i)
            self.ages[i] = 0

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, optims = {}, []
        for i, (net, opt) in enumerate(zip(self.models, self.optimizers)):
            tensors.update(module_tensors(f"pool{i}", net))
            t, rest = optimizer_tensors(f"pool{i}opt", opt)
            tensors.update(t)
            optims.append(rest)
        return tensors, {"ages": self.ages, "generations": self.generations, "optimizers": optims}

    def load_state(self, tensors: dict[str, torch.Tensor], record: dict) -> None:
        self.ages, self.generations = list(record["ages"]), list(record["generations"])
        for i in range(self.cfg.num_models):
            self._fresh(i)
            load_module_tensors(f"pool{i}", self.models[i], tensors)
            load_optimizer_tensors(f"pool{i}opt", self.optimizers[i], tensors, record["optimizers"][i])


@POOL_MODES.register("random-features")
class RandomFeaturePool:
    """A fresh, untrained net for every outer step (random-feature KRR): the ablation of the trained pool."""

    def __init__(self, cfg: KRRConfig, make_net: NetFactory, x: torch.Tensor, y: torch.Tensor):
        self.cfg, self.make_net = cfg, make_net
        self.draws = 0
        self._current: nn.Module | None = None

    def select(self, generator: torch.Generator) -> int:
        self.draws += 1
        self._current = self.make_net(derive_seed(self.cfg.seed, "random-features", self.draws))
        return 0

    def model(self, i: int) -> nn.Module:
        assert self._current is not None, "select() first"
        return self._current

    def update(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self._current = None

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"draws": self.draws}

    def load_state(self, tensors: dict[str, torch.Tensor], record: dict) -> None:
        self.draws = int(record["draws"])


# ---------------------------------------------------------------- distillation


@dataclass
class KRRResult:
    images: torch.Tensor  # float32 [n, C, H, W], model input space
    targets: torch.Tensor  # float32 [n, D], learned representations
    source_indices: torch.Tensor  # int64 [n]: the source images X_s started from
    history: list[dict]  # {"step", "loss", "lr"} per outer step
    seconds: float  # wall time of this call (a resumed run counts only its own part)
    resumed_from: int | None  # outer step restored from the checkpoint, None for a fresh start
    pool: dict = field(default_factory=dict)  # pool summary: mode, ages/resets or draws


def init_indices(num_source: int, cfg: KRRConfig) -> torch.Tensor:
    """The source rows X_s starts from: a seeded random sample without replacement, ascending."""
    if cfg.num_images > num_source:
        raise ValueError(
            f"num_images={cfg.num_images} synthetic images requested but the source has only {num_source} "
            f"images; use num_images <= {num_source} (KRR-ST uses ~2% of the source)"
        )
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "init-images"))
    return torch.sort(torch.randperm(num_source, generator=generator)[: cfg.num_images]).values


@torch.no_grad()
def representations(teacher: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """teacher.embed(x) in eval mode, batched, on x's device."""
    teacher.eval()
    return torch.cat([teacher.embed(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]).float()


def check_targets(teacher_dim: int, targets: torch.Tensor, where: str) -> None:
    """Refuse targets whose width is not the teacher's representation size."""
    if targets.dim() != 2 or targets.shape[1] != teacher_dim:
        raise ValueError(
            f"{where}: targets are {tuple(targets.shape)} but the teacher's representation has {teacher_dim} "
            "dimensions; use the teacher the targets were made with"
        )


def _teacher_dim(teacher: nn.Module, x: torch.Tensor) -> int:
    return int(representations(teacher, x[:2]).shape[1])


def _make_factory(cfg: KRRConfig, channels: int, image_size: int, out_dim: int, dev: torch.device) -> NetFactory:
    def make(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = create_net(cfg.net, num_classes=out_dim, channels=channels, image_size=image_size, **cfg.net_kwargs)
        return net.to(dev)

    return make


def krr_distill(
    cfg: KRRConfig,
    source: torch.Tensor,
    teacher: nn.Module,
    *,
    work_dir: str | Path | None = None,
    init_targets: torch.Tensor | None = None,
    identity: dict | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> KRRResult:
    """Distill float source images [N, C, H, W] (model input space) into cfg.num_images images with targets.

    teacher: a net with `.embed(x) -> [N, D]` (distill.ssl.load_teacher). init_targets: start
    Y_s from these [num_images, D] instead of the teacher's representations (must match D).
    work_dir: checkpoints go to <work_dir>/ckpt and a restarted call resumes from them (None:
    no checkpoints). identity: what else the run depends on (e.g. dataset and teacher
    fingerprints); a checkpoint of another identity is refused. progress(step, total,
    loss=, lr=) after every outer step. Raises FloatingPointError on a non-finite loss.
    """
    start = time.perf_counter()
    if source.dim() != 4 or not source.is_floating_point():
        raise ValueError(f"source must be float images [N, C, H, W]; got {source.dtype} {tuple(source.shape)}")
    indices = init_indices(source.shape[0], cfg)
    dev = resolve_device(device)
    teacher = teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dim = _teacher_dim(teacher, source[:2].to(dev))
    if init_targets is not None:
        check_targets(dim, init_targets, "init_targets")
        if init_targets.shape[0] != cfg.num_images:
            raise ValueError(f"init_targets has {init_targets.shape[0]} rows; num_images is {cfg.num_images}")

    x_syn = source[indices].to(dev, torch.float32).clone()
    y_syn = init_targets.to(dev).float().clone() if init_targets is not None else representations(teacher, x_syn)
    x_syn.requires_grad_(True)
    y_syn.requires_grad_(cfg.learn_targets)
    params = [x_syn, y_syn] if cfg.learn_targets else [x_syn]
    optimizer = torch.optim.AdamW(params, lr=cfg.outer_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "outer"))
    make_net = _make_factory(cfg, source.shape[1], source.shape[-1], dim, dev)
    history: list[dict] = []
    step0, resumed_from = 0, None

    checkpoint, saved = None, None
    if work_dir is not None:
        ident = {
            "config": cfg.model_dump(mode="json"),
            "source_shape": list(source.shape),
            "target_dim": dim,
            "init_targets": init_targets is not None,
            **(identity or {}),
        }
        checkpoint = Checkpoint(Path(work_dir) / "ckpt", ident, kind="krr-st")
        saved = checkpoint.load()
    if saved is not None:
        tensors, record = saved.tensors, saved.record
        check_targets(dim, tensors["y_syn"], f"checkpoint {checkpoint.dir}")
        pool = _restore_pool(cfg, make_net, tensors, record["pool"])
        with torch.no_grad():
            x_syn.copy_(tensors["x_syn"])
            y_syn.copy_(tensors["y_syn"])
        load_optimizer_tensors("outer", optimizer, tensors, record["optimizer"])
        generator.set_state(tensors["rng"])
        history, step0 = record["history"], saved.step
        resumed_from = step0
    else:
        pool = POOL_MODES[cfg.pool_mode](cfg, make_net, x_syn.detach(), y_syn.detach())

    real = source.to(dev, torch.float32)
    augment = AUGMENTS[cfg.augment]
    real_batch = min(cfg.real_batch, real.shape[0])
    for step in range(step0 + 1, cfg.outer_steps + 1):
        lr = cfg.outer_lr * (1.0 + (cfg.lr_end_factor - 1.0) * (step - 1) / max(cfg.outer_steps - 1, 1))
        for group in optimizer.param_groups:  # a function of the step only: resumed runs agree
            group["lr"] = lr
        i = pool.select(generator)
        model = pool.model(i)
        model.eval()  # BN uses its running statistics, as the reference does
        for p in model.parameters():
            p.requires_grad_(False)
        idx = torch.randperm(real.shape[0], generator=generator)[:real_batch].to(dev)
        x_real = augment(real[idx], generator)
        with torch.no_grad():
            y_real = teacher.embed(x_real).float()
            f_real = with_bias(model.embed(x_real))
        pred = krr_predict(with_bias(model.embed(x_syn)), f_real, y_syn, cfg.ridge)
        loss = F.mse_loss(pred, y_real)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"KRR-ST loss became {loss.item()} at outer step {step}/{cfg.outer_steps} "
                f"(outer_lr={cfg.outer_lr}, ridge={cfg.ridge}); lower outer_lr or check the source for inf/nan"
            )
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        pool.update(i, x_syn.detach(), y_syn.detach())
        history.append({"step": step, "loss": loss.item(), "lr": lr})
        if checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == cfg.outer_steps):
            pool_tensors, pool_record = pool.state()
            opt_tensors, opt_rest = optimizer_tensors("outer", optimizer)
            checkpoint.save(
                step,
                {"x_syn": x_syn, "y_syn": y_syn, "rng": generator.get_state(), **pool_tensors, **opt_tensors},
                {"pool": pool_record, "optimizer": opt_rest, "history": history},
            )
        if progress is not None:
            progress(step, cfg.outer_steps, loss=history[-1]["loss"], lr=lr)

    return KRRResult(
        images=x_syn.detach().cpu(),
        targets=y_syn.detach().cpu(),
        source_indices=indices,
        history=history,
        seconds=time.perf_counter() - start,
        resumed_from=resumed_from,
        pool=_pool_summary(cfg, pool),
    )


def _restore_pool(cfg: KRRConfig, make_net: NetFactory, tensors: dict, record: dict):
    """A pool rebuilt from checkpoint tensors, without re-running the initial online training."""
    cls = POOL_MODES[cfg.pool_mode]
    pool = cls.__new__(cls)
    pool.cfg, pool.make_net = cfg, make_net
    if cls is OnlinePool:
        pool.models, pool.optimizers = [], []
        pool.ages, pool.generations = [0] * cfg.num_models, [0] * cfg.num_models
    else:
        pool.draws, pool._current = 0, None
    pool.load_state(tensors, record)
    return pool


def _pool_summary(cfg: KRRConfig, pool) -> dict:
    if isinstance(pool, OnlinePool):
        return {"mode": cfg.pool_mode, "ages": list(pool.ages), "resets": pool.resets}
    return {"mode": cfg.pool_mode, "draws": pool.draws}


# ---------------------------------------------------------------- transfer evaluation

# How a student pretrains on a KRR-ST set (pretrain_krr_st.py): SGD 0.1, momentum 0.9, wd 1e-3,
# batch 256, no augmentation (the targets are the representations of these exact images), 1000
# epochs: a set of ~100 images gives one step per epoch. The loss is set per method (mse for
# representation targets, ce for labels). Everything after pretraining is the shared recipe.
KRR_PRETRAIN = TrainConfig(
    epochs=1000, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-3, schedule="cosine", loss="mse", augment="none"
)


def krr_transfer() -> TransferConfig:
    """The shared transfer recipe with KRR-ST's student (its pool ConvNet) and pretraining budget."""
    return TransferConfig(net="convnet_bn", net_kwargs={}, pretrain=KRR_PRETRAIN)


@dataclass(frozen=True)
class Method:
    """What a compared method pretrains the student on (and with which loss) before transfer."""

    data: Literal["distilled", "initial", "none", "teacher"]  # distilled set, its step-0 set, nothing, the teacher
    loss: Literal["mse", "ce"] | None
    description: str


METHODS: Registry[Method] = Registry(
    "method",
    {
        "krr-st": Method("distilled", "mse", "student pretrained by MSE on the distilled images and learned targets"),
        "random-real-targets": Method(
            "initial", "mse", "same random real images with the teacher's representations (KRR-ST at step 0)"
        ),
        "random-real-ce": Method("initial", "ce", "same random real images, cross-entropy on their true labels"),
        "no-pretrain": Method("none", None, "a randomly initialized student"),
        "teacher": Method("teacher", None, "the self-supervised teacher itself (upper bound)"),
    },
)


def check_methods(names: list[str]) -> list[str]:
    return METHODS.check_all(names)


def check_labels(method: str, labels: torch.Tensor | None) -> torch.Tensor:
    """Refuse an unlabelled source (no labels, or a single class) for a method that trains on labels."""
    if labels is None or labels.numel() == 0 or int(torch.unique(labels).numel()) < 2:
        raise ValueError(
            f"method {method!r} trains with cross-entropy on class labels, but the source is unlabelled "
            f"({'no labels' if labels is None else f'{int(torch.unique(labels).numel())} distinct label(s)'}); "
            f"drop it from the methods or use a labelled source"
        )
    return labels


def pretrained_backbone(
    method: str,
    cfg: TransferConfig,
    *,
    image_shape: tuple[int, int, int],
    images: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict]:
    """The backbone `method` hands to transfer, and its pretraining summary.

    distilled/initial methods pretrain a fresh student with distill.transfer.pretrain (loss per
    METHODS); "no-pretrain" returns a fresh student, "teacher" the teacher.
    """
    spec = METHODS[check_methods([method])[0]]
    student_seed = derive_seed(seed, "student")
    if spec.data == "teacher":
        if teacher is None:
            raise ValueError(f"method {method!r} needs the teacher")
        return teacher, {}
    if spec.data == "none":
        return pretrain(cfg, None, None, loss="none", image_shape=image_shape, seed=student_seed)[0], {}
    if images is None:
        raise ValueError(f"method {method!r} needs pretraining images")
    if spec.loss == "ce":
        y = check_labels(method, labels)
    elif targets is None:
        raise ValueError(f"method {method!r} needs representation targets")
    else:
        y = targets
    net, info = pretrain(cfg, images, y, loss=spec.loss, seed=student_seed, device=device, progress=progress)
    return net, {"pretrain_loss": info["pretrain_loss"], "pretrain_seconds": info["pretrain_seconds"]}


def loss_curve(history: list[dict], window: int = 0) -> tuple[list[int], list[float]]:
    """Steps and a moving average of the outer loss (window ~ 2% of the run when 0), for plots."""
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    w = window or max(1, len(losses) // 50)
    smooth, total = [], 0.0
    for j, v in enumerate(losses):
        total += v
        if j >= w:
            total -= losses[j - w]
        smooth.append(total / min(j + 1, w))
    return steps, [float(v) if math.isfinite(v) else float("nan") for v in smooth]

"""Train several networks of one architecture together: the evaluation nets of one setting.

The N evaluation nets of a setting (same architecture, recipe and training set, different
seeds) are independent, so their parameters can be stacked (`torch.func.stack_module_state`)
and every step run once for all of them with `torch.func.vmap` over `functional_call`: one
larger kernel per layer instead of N small ones. Each net keeps its own randomness exactly as
`distill.train.train` draws it (its init from `seed_everything(seed)`, its batch order and
augmentations from its own generator seeded by `seed`), and SGD/Adam updates are elementwise,
so net i follows the same trajectory as when trained alone. Only float rounding differs
(vmap turns convolutions into grouped ones): float64 runs agree to ~1e-12, float32 runs to
rounding that training may amplify over many epochs.

Nets with buffers (BatchNorm running statistics) and layers without a vmap rule (the fused
instance norm, which only pays off under double backward) are refused with ValueError by
`check_batchable`; callers then train one by one.

    results = train_batched(nets, x, y, cfg, seeds=[0, 1, 2])   # one TrainResult per net
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn

from distill.allocator import keep_freed_memory
from distill.augment import AUGMENTS
from distill.fused_norm import InstanceNorm
from distill.train import (
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    TrainResult,
    _prepare_targets,
    check_finite_losses,
)
from distill.utils import Progress, peak_memory_mb, resolve_device


def check_batchable(nets: list[nn.Module]) -> None:
    """Raise ValueError unless `nets` can be trained together (same architecture, no buffers, vmap-able)."""
    if not nets:
        raise ValueError("need at least one net")
    layout = [(name, p.shape) for name, p in nets[0].named_parameters()]
    for net in nets[1:]:
        if [(name, p.shape) for name, p in net.named_parameters()] != layout:
            raise ValueError("nets trained together must share one architecture (same parameter names and shapes)")
    if any(True for _ in nets[0].buffers()):
        raise ValueError(
            "nets with buffers (e.g. BatchNorm running statistics) cannot be trained together; train them one by one"
        )
    if any(isinstance(m, InstanceNorm) for m in nets[0].modules()):
        raise ValueError(
            "the fused instance norm has no vmap rule; use norm='instance' for evaluation nets "
            "(the fused one only speeds up double backward)"
        )


def train_batched(
    nets: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    seeds: list[int],
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> list[TrainResult]:
    """`distill.train.train(nets[i], x, y, cfg, seed=seeds[i])` for every i, all nets in one vmapped step.

    The nets are trained in place. progress(epoch, epochs, loss=, acc=) gets the means over nets.
    Raises ValueError (check_batchable) and FloatingPointError naming the net whose loss stops being finite.
    """
    check_batchable(nets)
    if len(seeds) != len(nets):
        raise ValueError(f"need one seed per net; got {len(seeds)} seeds for {len(nets)} nets")
    dev = resolve_device(device)
    keep_freed_memory()
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    y = _prepare_targets(y, cfg.loss, n).to(dev)
    x = x.to(dev, torch.float32)
    for net in nets:
        net.to(dev).train()
    params, _ = torch.func.stack_module_state(nets)  # leaves [K, ...] with requires_grad
    template = copy.deepcopy(nets[0]).to("meta")

    def forward(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(template, p, (xb,))

    forward_all = torch.func.vmap(forward, in_dims=(0, 0), randomness="error")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    augment, loss_fn = AUGMENTS[cfg.augment], LOSSES[cfg.loss]
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = OPTIMIZERS[cfg.optimizer](list(params.values()), cfg)
    schedule = SCHEDULES[cfg.schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step / total_steps))
    labels = y if y.dim() == 1 else y.argmax(1)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    k = len(nets)
    histories: list[list[dict]] = [[] for _ in nets]
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        orders = [torch.randperm(n, generator=g).to(dev) for g in generators]
        step_losses, correct = [], torch.zeros(k, device=dev)
        for step in range(steps_per_epoch):
            idx = [order[step * batch_size : (step + 1) * batch_size] for order in orders]
            xs = torch.stack([augment(x[i], g) for i, g in zip(idx, generators)])
            out = forward_all(params, xs)
            losses = torch.stack([loss_fn(out[j], y[i], cfg.label_smoothing) for j, i in enumerate(idx)])
            optimizer.zero_grad(set_to_none=True)
            # each net's loss depends on its own slice of the stacked parameters only
            losses.sum().backward()
            optimizer.step()
            scheduler.step()
            step_losses.append(losses.detach() * len(idx[0]))
            correct += torch.stack([(out[j].detach().argmax(1) == labels[i]).sum() for j, i in enumerate(idx)])
        step_losses = torch.stack(step_losses, 1)  # [K, steps]
        for j in range(k):
            check_finite_losses(
                step_losses[j],
                f"epoch {epoch}/{cfg.epochs} of net {j} (seed {seeds[j]})",
                f"lr={cfg.lr}, optimizer={cfg.optimizer}",
            )
        sums, accs = step_losses.sum(1).tolist(), correct.tolist()
        for j in range(k):
            histories[j].append({"epoch": epoch, "loss": sums[j] / n, "train_acc": accs[j] / n})
        if progress is not None:
            progress(epoch, cfg.epochs, loss=sum(sums) / (k * n), acc=sum(accs) / (k * n))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for j, net in enumerate(nets):
            for name, p in net.named_parameters():
                p.copy_(params[name][j])
    memory = peak_memory_mb(dev)
    return [TrainResult(h, dict(h[-1]), seconds, memory) for h in histories]

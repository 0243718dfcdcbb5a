"""The shared evaluation protocol: train fresh networks on a (small) training set, test on real data.

Every method and its baselines go through `evaluate_set` with the same `EvalConfig`, so a
distilled set and the random real subset it is compared with differ only in their images
(and, where the method learned one, the learning rate). The reported number is the
accuracy after the final epoch, never the maximum over test evaluations; `evaluate_seeds` runs
several seeds (optionally trained together, distill.batched); `summarize` gives
mean and std over seeds, `summarize_groups` one such row per (method, setting, ...) of a
metrics table.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from pydantic import ConfigDict, Field

from distill.nets import NetFields, NetName, create_net
from distill.precision import PrecisionField, precision_context
from distill.train import TrainConfig, evaluate, train
from distill.utils import Progress, peak_rss_mb, resolve_device, seed_everything


class EvalConfig(NetFields, PrecisionField):
    """How a training set is judged: N fresh networks, one recipe, final-epoch test accuracy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    net: NetName = Field("convnet", description="Registered network trained on the set (see distill.nets).")
    net_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"width": 128, "depth": 3, "norm": "instance"},
        description="Constructor arguments; MTT's evaluation ConvNet is width 128, depth 3, instance norm.",
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            epochs=1000, batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4, augment="dsa"
        ),
        description="Training recipe; MTT/DC evaluate with 1000 epochs, lr x0.1 at half, DSA augmentation.",
    )
    num_models: int = Field(5, ge=1, description="Fresh networks per set; mean and std are over these.")
    use_learned_lr: bool = Field(
        True, description="A distilled set's learned learning rate replaces train.lr (MTT's protocol)."
    )

    def recipe(self, learned_lr: float | None = None) -> dict[str, Any]:
        """The recipe as stored with a dataset, with the learning rate actually used."""
        train_cfg = self.train_config(learned_lr)
        return {"net": self.net, "net_kwargs": dict(self.net_kwargs), "train": train_cfg.model_dump(mode="json")}

    def train_config(self, learned_lr: float | None = None) -> TrainConfig:
        if learned_lr is not None and self.use_learned_lr:
            return self.train.model_copy(update={"lr": float(learned_lr)})
        return self.train


def evaluate_set(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: EvalConfig,
    *,
    num_classes: int,
    seed: int,
    learned_lr: float | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train one fresh network on (train_x, train_y) and return its final test metrics and cost."""
    dev = resolve_device(device)
    seed_everything(seed)
    net = create_net(
        cfg.net,
        num_classes=num_classes,
        channels=train_x.shape[1],
        image_size=train_x.shape[-1],
        **cfg.net_kwargs,
    )
    train_cfg = cfg.train_config(learned_lr)
    start = time.perf_counter()
    with precision_context(cfg.precision, dev):
        result = train(net, train_x, train_y, train_cfg, device=dev, seed=seed, progress=progress)
        seconds = time.perf_counter() - start
        test = evaluate(net, test_x, test_y, device=dev)
    return _row(seed, test, result, train_x, train_cfg, seconds, dev)


# Whether evaluate_seeds trains the nets of a setting together by default (benchmarks/evaluate_speed.py).
BATCHED_DEFAULT = False


def evaluate_seeds(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: EvalConfig,
    *,
    num_classes: int,
    seeds: Sequence[int],
    learned_lr: float | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    batched: bool | None = None,
) -> list[dict[str, Any]]:
    """`evaluate_set` for every seed: one row each, in seed order.

    batched (None: BATCHED_DEFAULT) trains the nets together (distill.batched: one vmapped step for
    all), each from the same init, batches and augmentations as alone, so the rows equal the
    one-by-one rows up to float rounding; train_seconds is then the shared time / number of nets.
    Nets that cannot be batched (buffers, fused norm) are trained one by one.
    """
    from distill.batched import check_batchable, train_batched

    seeds = list(seeds)
    if not (batched if batched is not None else BATCHED_DEFAULT) or len(seeds) < 2:
        return [
            evaluate_set(
                train_x,
                train_y,
                test_x,
                test_y,
                cfg,
                num_classes=num_classes,
                seed=s,
                learned_lr=learned_lr,
                device=device,
                progress=progress,
            )
            for s in seeds
        ]
    dev = resolve_device(device)
    nets = []
    for seed in seeds:
        seed_everything(seed)
        nets.append(
            create_net(
                cfg.net,
                num_classes=num_classes,
                channels=train_x.shape[1],
                image_size=train_x.shape[-1],
                **cfg.net_kwargs,
            )
        )
    try:
        check_batchable(nets)
    except ValueError:
        return evaluate_seeds(
            train_x,
            train_y,
            test_x,
            test_y,
            cfg,
            num_classes=num_classes,
            seeds=seeds,
            learned_lr=learned_lr,
            device=device,
            progress=progress,
            batched=False,
        )
    train_cfg = cfg.train_config(learned_lr)
    rows = []
    with precision_context(cfg.precision, dev):
        results = train_batched(nets, train_x, train_y, train_cfg, seeds=seeds, device=dev, progress=progress)
        for seed, net, result in zip(seeds, nets, results):
            test = evaluate(net, test_x, test_y, device=dev)
            rows.append(_row(seed, test, result, train_x, train_cfg, result.seconds / len(seeds), dev))
    return rows


def _row(
    seed: int, test: dict, result: Any, train_x: torch.Tensor, train_cfg: Any, seconds: float, dev: torch.device
) -> dict[str, Any]:
    return {
        "seed": seed,
        "test_acc": float(test["acc"]),
        "test_loss": float(test["loss"]),
        "train_acc": float(result.final.get("train_acc", float("nan"))),
        "train_images": int(train_x.shape[0]),
        "lr": float(train_cfg.lr),
        "epochs": int(train_cfg.epochs),
        "train_seconds": round(seconds, 3),
        "peak_rss_mb": peak_rss_mb(),
        "device": str(dev),
    }


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample std (n-1) of per-seed accuracies; std is 0 for a single seed."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarize_groups(
    rows: list[dict[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str],
    *,
    sort_key: Callable[[tuple], Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per group of `rows` sharing the values of `by`: those values, `<metric>_mean` and
    `<metric>_std` (summarize) of every metric, and `seeds`, the number of rows in the group.

    A metric missing or None in a row is skipped there; a metric no row of a group has gets no
    columns in it. Groups come in first-seen order, or sorted by sort_key(group values).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    keys = sorted(groups, key=sort_key) if sort_key is not None else list(groups)
    out = []
    for key in keys:
        members = groups[key]
        entry: dict[str, Any] = dict(zip(by, key))
        for metric in metrics:
            values = [r[metric] for r in members if r.get(metric) is not None]
            if values:
                s = summarize(values)
                entry[f"{metric}_mean"], entry[f"{metric}_std"] = s["mean"], s["std"]
        entry["seeds"] = len(members)
        out.append(entry)
    return out

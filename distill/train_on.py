"""Train networks on any distilled or pruned artifact, the way it was made to be trained on.

    python -m distill.train_on artifacts/random-real/<key> --data ../shared/data/cifar10
    python -m distill.train_on ARTIFACT --arch resnet18 --seeds 0 1 2 --out metrics.parquet
    python -m distill.train_on user/distilled-cifar10        # a hub dataset repository
    python -m distill.train_on artifacts/pruned/<key> --data ../shared/data/tiny-imagenet-200 --test-split valid

What the artifact carries decides the recipe: its pixels are already in the model's input
space, real test images go through the stored normalization or ZCA, the learned lr replaces
the recipe's lr, and the loss follows the labels: cross-entropy on hard labels, soft
cross-entropy on soft labels, or, for a regression-target set (KRR-ST), MSE pretraining
followed by a linear probe and a full fine-tune on the real data's train split. `--arch`
trains another architecture under the same recipe (cross-architecture generalization).
Accuracy is the final epoch's, per seed, with mean and std: a progress bar per network on
stderr and a table at the end, or with `--json` one JSON line per seed and the summary last.
The artifact is verified against its `manifest.json` (sizes and sha256) before anything is
read; `--no-verify` skips that for a folder you trust. Bad arguments end with one line on
stderr and exit code 2, before any training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any, Callable

import torch

from distill.data import DataError
from distill.downstream import DistilledDataset, load_distilled
from distill.evaluate import EvalConfig, evaluate_set, summarize
from distill.krr import pretrained_backbone
from distill.nets import create_net, list_nets, net_arg_problem
from distill.transfer import TransferConfig, transfer
from distill.utils import Progress, resolve_device


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"width\": 64}}', got {text!r}")
    return value


def _net(ds: DistilledDataset, arch: str | None, net_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    name, kwargs = ds.net
    if arch is not None and arch != name:
        name, kwargs = arch, {}
    if net_kwargs is not None:
        kwargs = net_kwargs
    problem = net_arg_problem(name, kwargs)
    if problem:
        raise DataError(problem)
    channels, size = int(ds.pixels.shape[1]), int(ds.pixels.shape[-1])
    try:  # a trial build, so a bad value (width "x", depth 0) is one clear line before any training
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about zero-element tensors before it fails
            create_net(name, num_classes=max(len(ds.class_names), 1), channels=channels, image_size=size, **kwargs)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:
        raise DataError(
            f"net {name!r} cannot be built with {json.dumps(kwargs)} for {channels}x{size}x{size} "
            f"images: {type(e).__name__}: {e}"
        ) from None
    return name, kwargs


def train_labelled(
    ds: DistilledDataset,
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    net: str,
    net_kwargs: dict[str, Any],
    seed: int,
    epochs: int | None,
    device: torch.device,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One fresh network on a labelled set (hard or soft labels), tested on the real test split."""
    train_cfg = ds.train_config(**({"epochs": epochs} if epochs else {}))
    cfg = EvalConfig(net=net, net_kwargs=net_kwargs, train=train_cfg, num_models=1, use_learned_lr=False)
    row = evaluate_set(
        ds.pixels, ds.y, *test, cfg, num_classes=len(ds.class_names), seed=seed, device=str(device), progress=progress
    )
    return {"net": net, **row}


def train_targets(
    ds: DistilledDataset,
    source: str | None,
    *,
    net: str,
    net_kwargs: dict[str, Any],
    seed: int,
    epochs: int | None,
    device: torch.device,
) -> dict[str, Any]:
    """Pretrain on (images, targets) by MSE, then linear probe and fine-tune on the real target task,
    with the shared transfer recipe (distill.transfer; the probe and fine-tune stored with the set, else
    its defaults)."""
    stored = ds.recipe.get("transfer") or {}
    pretrain = ds.train_config(**({"epochs": epochs} if epochs else {}))
    cfg = TransferConfig(
        net=net,
        net_kwargs=net_kwargs,
        pretrain=pretrain,
        **{k: stored[k] for k in ("linear_probe", "fine_tune") if k in stored},
    )
    backbone, info = pretrained_backbone(
        "krr-st",
        cfg,
        image_shape=tuple(ds.pixels.shape[1:]),
        images=ds.pixels,
        targets=ds.targets,
        seed=seed,
        device=device,
    )
    train_x, train_y = ds.real_split("train", source)
    test_x, test_y = ds.real_split("test", source)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    row = transfer(backbone, train_x, train_y, test_x, test_y, cfg, num_classes=num_classes, seed=seed, device=device)
    return {
        "net": net,
        "seed": seed,
        "pretrain_images": len(ds),
        "pretrain_seconds": round(info["pretrain_seconds"], 3),
        "linear_probe_acc": row["linear_probe_acc"],
        "fine_tune_acc": row["fine_tune_acc"],
        "test_acc": row["fine_tune_acc"],
        "device": str(device),
    }


def run(
    artifact: str,
    *,
    data: str | None = None,
    arch: str | None = None,
    net_kwargs: dict[str, Any] | None = None,
    seeds: list[int] = (0,),
    epochs: int | None = None,
    device: str | None = None,
    test_split: str | None = None,
    verify: bool = True,
    reporter: Callable[[int], Progress | None] | None = None,
) -> dict[str, Any]:
    """Train one network per seed on `artifact`; returns per-seed rows and the summary."""
    if epochs is not None and epochs < 1:
        raise DataError(f"epochs must be >= 1 (got {epochs}); leave it out to use the set's recipe")
    if not seeds:
        raise DataError("give at least one seed")
    ds = load_distilled(artifact, verify=verify)
    net, kwargs = _net(ds, arch, net_kwargs)
    dev = resolve_device(device)
    cfg = ds.data_config(data)  # fails now, not after training, when no real data can be found
    if test_split is not None:
        if test_split == cfg.train_split:
            raise DataError(f"--test-split {test_split!r} is the training split; testing on it measures nothing")
        ds.provenance = {
            **ds.provenance,
            "data": {
                **(ds.provenance.get("data") or {"source": cfg.source, "image_size": cfg.image_size}),
                "test_split": test_split,
            },
        }
    if ds.kind == "targets":
        rows = [train_targets(ds, data, net=net, net_kwargs=kwargs, seed=s, epochs=epochs, device=dev) for s in seeds]
    else:
        test = ds.test_set(data)
        rows = [
            train_labelled(
                ds,
                test,
                net=net,
                net_kwargs=kwargs,
                seed=s,
                epochs=epochs,
                device=dev,
                progress=reporter(s) if reporter else None,
            )
            for s in seeds
        ]
    summary: dict[str, Any] = {
        "artifact": artifact,
        "method": ds.method,
        "kind": ds.kind,
        "net": net,
        "images": len(ds),
        "classes": len(ds.class_names),
    }
    for metric in ("test_acc", "linear_probe_acc", "fine_tune_acc"):
        if metric in rows[0]:
            s = summarize([r[metric] for r in rows])
            summary |= {f"{metric}_mean": s["mean"], f"{metric}_std": s["std"]}
    summary["seeds"] = list(seeds)
    return {"rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="artifact folder (distilled or image-dataset format) or hub repo owner/name")
    parser.add_argument("--data", help="real dataset the set was made from (for its test split); default: recorded")
    parser.add_argument("--arch", help=f"train another architecture; one of {', '.join(list_nets())}")
    parser.add_argument("--net-kwargs", type=_json_object, help="constructor kwargs as JSON, e.g. '{\"width\": 64}'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one fresh network per seed")
    parser.add_argument("--epochs", type=_positive_int, help="override the recipe's epochs (e.g. a quick check)")
    parser.add_argument(
        "--test-split",
        help="split of the real data to test on (default: the recorded one, "
        "usually 'test'; Tiny-ImageNet's is 'valid')",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip checking the artifact against its manifest")
    parser.add_argument("--device", default="auto", help='"auto", "cpu", "cuda" or "cuda:N"')
    parser.add_argument("--out", help="also write the per-seed rows as a metrics Parquet file")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line per seed and the summary "
        "as the last line (for machines), instead of progress and a table",
    )
    args = parser.parse_args(argv)
    if args.arch is not None and args.arch not in list_nets():
        parser.error(f"unknown architecture {args.arch!r}; valid: {', '.join(list_nets())}")
    try:
        result = run(
            args.artifact,
            data=args.data,
            arch=args.arch,
            net_kwargs=args.net_kwargs,
            seeds=args.seeds,
            epochs=args.epochs,
            device=args.device,
            test_split=args.test_split,
            verify=not args.no_verify,
            reporter=None if args.json else EpochBar,
        )
    except (DataError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.out:
        from distill.formats import write_metrics

        write_metrics(args.out, [{**r, "artifact": args.artifact} for r in result["rows"]])
    if args.json:
        for row in result["rows"]:
            print(json.dumps(row))
        print(json.dumps(result["summary"]))
    else:
        print(summary_table(result))
    return 0


class EpochBar:
    """Per-network progress on stderr: a live bar on a terminal, a line per 10% otherwise."""

    def __init__(self, seed: int, stream: Any = None):
        self.seed, self.stream = seed, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self.last_decile = -1

    def __call__(self, step: int, total: int, **metrics: Any) -> None:
        frac = step / max(total, 1)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        loss = metrics.get("loss")
        text = (
            f"seed {self.seed}: epoch {step}/{total} [{'#' * int(20 * frac):<20}] {100 * frac:3.0f}%"
            f"{f'  loss {loss:.3f}' if isinstance(loss, float) else ''}  {elapsed:4.0f}s elapsed, ETA {eta:4.0f}s"
        )
        if self.tty:
            print("\r" + text + ("\n" if step >= total else ""), end="", file=self.stream, flush=True)
        elif int(10 * frac) > self.last_decile or step >= total:
            self.last_decile = int(10 * frac)
            print(text, file=self.stream, flush=True)


def summary_table(result: dict[str, Any]) -> str:
    """Per-seed accuracies and their mean +- std as a small text table (percent, one decimal)."""
    summary, rows = result["summary"], result["rows"]
    metrics = [m for m in ("test_acc", "linear_probe_acc", "fine_tune_acc") if m in rows[0]]
    if summary["kind"] == "targets":
        metrics = [m for m in metrics if m != "test_acc"]
    names = {"test_acc": "test accuracy", "linear_probe_acc": "linear probe", "fine_tune_acc": "fine-tune"}
    what = summary["method"] or "dataset"
    lines = [
        f"{summary['artifact']}: {what} ({summary['kind']}), {summary['images']} images, "
        f"{summary['classes']} classes, net {summary['net']}",
        "  " + "seed".ljust(6) + "".join(names[m].rjust(16) for m in metrics),
    ]
    for row in rows:
        lines.append("  " + str(row["seed"]).ljust(6) + "".join(f"{100 * row[m]:15.1f}%" for m in metrics))
    lines.append(
        "  "
        + "mean".ljust(6)
        + "".join(f"{100 * summary[f'{m}_mean']:9.1f} +- {100 * summary[f'{m}_std']:3.1f}" for m in metrics)
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: does pretraining on the source matter for the target? Full source vs no pretraining.

    .venv/bin/python benchmarks/transfer_regime.py --preset cpu      # the prune-eval/cpu regime, 3 seeds
    .venv/bin/python benchmarks/transfer_regime.py --preset cpu --set source.train_per_class=250 \
        --set transfer.pretrain.epochs=4 --seeds 0                   # a screen of another regime

Every DP4TL and KRR-ST number is only worth reading where pretraining on the source beats no
pretraining clearly; this benchmark measures exactly that, in-process and on one thread, with
the source, target and transfer recipe of the `prune-eval` preset (deployments/presets/
prune-eval.yaml) and the shared recipe of distill.transfer: per seed, a fresh net pretrained on
the whole source (cross-entropy, the preset's epochs) and a fresh untrained net, each judged on
the target by linear probe and fine-tune. Reported: the source's held-out accuracy of the
pretrained net, both accuracies per arm and seed, and the paired gaps (full minus scratch, per
seed) with mean and std, in points. Goal: both gaps >= 5 points on average.

Appends to benchmarks/records/transfer_regime.jsonl (see benchmarks/records.py). The last line
of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DISTILLERY_DATA", REPO.parent / "shared" / "data"))
GAP_POINTS = 5.0  # what "the source matters" means here (issue 13)

from benchmarks.records import append_record, loadavg  # noqa: E402
from distill.data import DataConfig  # noqa: E402
from distill.train import evaluate  # noqa: E402
from distill.transfer import TransferConfig, pretrain, transfer  # noqa: E402
from distill.transforms import Preprocessor  # noqa: E402
from flows.presets import load_preset, presets  # noqa: E402


def apply_overrides(params: dict, items: list[str]) -> dict:
    """KEY=VALUE (dotted key, YAML value) into a nested dict, in place."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"--set needs KEY=VALUE (e.g. transfer.pretrain.epochs=4); got {item!r}")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return params


def data_config(block: dict) -> DataConfig:
    """A preset data block with its source under DATA (presets name ../shared/data/<name>)."""
    return DataConfig(**{**block, "source": str(DATA / Path(block["source"]).name)})


def points(values: list[float]) -> dict:
    """Mean and sample std of accuracy fractions, in points with one decimal."""
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(mean, 1), "std": round(std, 1), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=presets("prune-eval"), default="cpu")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a prune-eval preset value by dotted key (YAML value)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the preset's selection seeds")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records")
    args = parser.parse_args()
    load_start = loadavg()
    params = apply_overrides(load_preset("prune-eval", args.preset), args.set)
    source_cfg, target_cfg = data_config(params["source"]), data_config(params["target"])
    cfg = TransferConfig(**params.get("transfer", {}))
    seeds = args.seeds or params.get("selection", {}).get("seeds", [0, 1, 2])
    for block in (source_cfg, target_cfg):
        if not Path(block.source).exists():
            sys.exit(f"{block.source} not found; set DISTILLERY_DATA to the folder holding it")
    torch.set_num_threads(1)
    wall = time.perf_counter()

    source, source_test = source_cfg.load(source_cfg.train_split), source_cfg.load(source_cfg.test_split)
    spre = Preprocessor.fit(source.images)
    sx, sy, vx, vy = spre(source.images), source.labels, spre(source_test.images), source_test.labels
    target, target_test = target_cfg.load(target_cfg.train_split), target_cfg.load(target_cfg.test_split)
    tpre = Preprocessor.fit(target.images)
    tx, ty, ttx, tty = tpre(target.images), target.labels, tpre(target_test.images), target_test.labels
    num_source, num_target = len(source.class_names), len(target.class_names)
    print(f"source {len(sy)} images / {num_source} classes, target {len(ty)} train / {len(tty)} test", flush=True)

    rows = []
    for seed in seeds:
        for arm in ("full", "scratch"):
            cpu, start = time.process_time(), time.perf_counter()
            if arm == "full":
                net, info = pretrain(cfg, sx, sy, loss="ce", out_dim=num_source, seed=seed, device="cpu")
                source_acc = evaluate(net, vx, vy, device="cpu")["acc"]
            else:
                net, info = pretrain(cfg, None, None, loss="none", image_shape=tuple(sx.shape[1:]), seed=seed)
                source_acc = None
            pretrain_cpu = time.process_time() - cpu
            row = transfer(net, tx, ty, ttx, tty, cfg, num_classes=num_target, seed=seed, device="cpu")
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    **row,
                    "source_test_acc": source_acc,
                    "pretrain_seconds": round(info["pretrain_seconds"], 1),
                    "pretrain_cpu_seconds": round(pretrain_cpu, 1),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    def arm(name: str, key: str) -> list[float]:
        return [r[key] for r in rows if r["arm"] == name]

    table, gaps = {}, {}
    for mode in cfg.modes:
        key = f"{mode}_acc"
        table[mode] = {"full": points(arm("full", key)), "scratch": points(arm("scratch", key))}
        gaps[mode] = points([f - s for f, s in zip(arm("full", key), arm("scratch", key))])
    result = {
        "benchmark": "transfer_regime",
        "preset": args.preset,
        "overrides": args.set,
        "source": f"{source_cfg.name} {len(sy)} images ({source_cfg.train_per_class or 'all'}/class) "
        f"@ {source_cfg.image_size}px",
        "target": f"{target_cfg.name} {len(ty)} train ({target_cfg.train_per_class or 'all'}/class), {len(tty)} test",
        "net": cfg.net,
        "net_kwargs": cfg.net_kwargs,
        "pretrain_epochs": cfg.pretrain.epochs,
        "seeds": seeds,
        "source_test_acc_points": points(arm("full", "source_test_acc")),
        "accuracy_points": table,
        "gap_full_minus_scratch_points": gaps,
        "full_pretrain_seconds_mean": round(statistics.mean(arm("full", "pretrain_seconds")), 1),
        "full_pretrain_cpu_seconds_mean": round(statistics.mean(arm("full", "pretrain_cpu_seconds")), 1),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "wall_note": "upper bound: other processes shared the 2 cores (see loadavg in the record)",
        "goals": {f"goal_full_beats_scratch_{m}_by_{GAP_POINTS:g}_points": gaps[m]["mean"] >= GAP_POINTS for m in gaps},
        "rows": rows,
    }
    if not args.no_record:
        append_record("transfer_regime", result, preset=args.preset, loadavg_start=load_start, overrides=args.set)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

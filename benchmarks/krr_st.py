"""Benchmark: KRR-ST outer-step cost at 100/500/1000 synthetic images, and target accuracy vs baselines.

    .venv/bin/python benchmarks/krr_st.py --preset cpu     # the distill-krr/cpu flow preset, ~10-15 min on 2 busy cores
    .venv/bin/python benchmarks/krr_st.py --preset tiny    # the tiny flow preset, well under a minute

Settings come from the `distill-krr` flow preset of the same name (deployments/presets/), so the
numbers are what `prefect deployment run 'distill-krr/cpu'` produces, computed with the same
core functions (distill.ssl, distill.krr) without the Prefect/artifact layer:

1. Step cost: seconds per outer step (one KRR solve + its backward + one online pool step) of the
   preset's pool net with 100, 500 and 1000 synthetic images on one thread, real batch as in the
   preset, median over steps after the pool's initial training (online budget 4, so the
   staggered pool initialization stays cheap).
2. Accuracy: teacher -> distilled set -> every method x 3 seeds, each (method, seed) a Ray task
   with one CPU, pretrain + linear probe + fine-tune on the target; final-epoch accuracies,
   mean and std over seeds. Goal: KRR-ST above every baseline except the teacher.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.evaluate import summarize  # noqa: E402
from distill.krr import METHODS, krr_distill, pretrained_backbone, representations, transfer  # noqa: E402
from distill.ssl import load_teacher, train_teacher  # noqa: E402
from distill.transforms import Preprocessor  # noqa: E402
from flows.krr_distill import DistillKRRConfig  # noqa: E402
from flows.presets import load_preset  # noqa: E402

STEP_SIZES = {"cpu": (100, 500, 1000), "tiny": (6, 12, 24)}


def _resolve(cfg_dict: dict) -> dict:
    """Preset paths are relative to the project root."""
    for block in ("source", "target"):
        src = cfg_dict[block]["source"]
        if not src.startswith("/"):
            cfg_dict[block] = {**cfg_dict[block], "source": str((REPO / src).resolve())}
    return cfg_dict


def step_seconds(cfg: DistillKRRConfig, x: torch.Tensor, teacher: torch.nn.Module, n: int) -> float:
    krr = cfg.krr.model_copy(update={"num_images": n, "outer_steps": 8, "online_iterations": 4})
    stamps: list[float] = []
    krr_distill(krr, x, teacher, device="cpu", progress=lambda s, t, **m: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def _evaluate(method: str, seed: int, cfg_json: str, pre: dict, teacher_path: str) -> dict:
    torch.set_num_threads(1)
    cfg = DistillKRRConfig.model_validate_json(cfg_json)
    teacher = load_teacher(teacher_path) if METHODS[method].data in ("initial", "teacher") else None
    images, targets, labels = pre["images"], pre["targets"], pre["labels"]
    if METHODS[method].data == "initial":
        images = pre["initial"]
        targets = representations(teacher, images)
    backbone, info = pretrained_backbone(method, cfg.transfer, image_shape=tuple(images.shape[1:]), images=images,
                                         targets=targets, labels=labels, teacher=teacher, seed=seed, device="cpu")
    start = time.perf_counter()
    row = transfer(backbone, *pre["target"], cfg.transfer, num_classes=pre["num_classes"], seed=seed, device="cpu")
    return {"method": method, "seed": seed, **row, **info, "transfer_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(STEP_SIZES), default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset value by dotted key, e.g. --set krr.outer_steps=2000 (YAML value)")
    args = parser.parse_args()
    params = load_preset("distill-krr", args.preset)
    for item in args.set:
        key, _, value = item.partition("=")
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    cfg = DistillKRRConfig(**_resolve(params))
    for block in (cfg.source, cfg.target):
        if not Path(block.source).exists():
            sys.exit(f"{block.source} not found; place ../shared/data beside the repo or set the preset's paths")
    torch.set_num_threads(1)
    wall = time.perf_counter()

    source = cfg.source.load(cfg.source.train_split)
    pre = Preprocessor.fit(source.images)
    x = pre(source.images)
    target_train, target_test = cfg.target.load(cfg.target.train_split), cfg.target.load(cfg.target.test_split)
    tpre = Preprocessor.fit(target_train.images)
    print(f"source {tuple(x.shape)}, target {len(target_train)} train / {len(target_test)} test", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = train_teacher(cfg.teacher, x, out_dir=tmp, device="cpu",
                                progress=lambda s, n, **m: print(f"teacher epoch {s}/{n} loss {m['loss']:.2f}", flush=True))
        teacher_s = time.perf_counter() - t
        teacher = load_teacher(summary["path"])

        steps = {}
        for n in STEP_SIZES[args.preset]:
            steps[n] = step_seconds(cfg, x, teacher, min(n, len(x)))
            print(f"outer step with {n} synthetic images: {steps[n]:.3f} s", flush=True)

        t = time.perf_counter()
        result = krr_distill(cfg.krr, x, teacher, device="cpu", progress=lambda s, n, **m: (
            print(f"KRR-ST step {s}/{n} loss {m['loss']:.4g}", flush=True) if s % 50 == 0 or s == n else None))
        distill_s = time.perf_counter() - t
        losses = [h["loss"] for h in result.history]

        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        shared = ray.put({
            "images": result.images, "targets": result.targets, "labels": source.labels[result.source_indices],
            "initial": x[result.source_indices], "num_classes": len(target_train.class_names),
            "target": (tpre(target_train.images), target_train.labels, tpre(target_test.images), target_test.labels),
        })
        remote = ray.remote(num_cpus=1)(_evaluate)
        t = time.perf_counter()
        futures = [remote.remote(m, s, cfg.model_dump_json(), shared, summary["path"])
                   for m in cfg.methods for s in range(cfg.seeds)]
        rows, pending = [], futures
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            row = ray.get(done[0])
            rows.append(row)
            print(f"{row['method']:>20} seed {row['seed']}: linear {row['linear_probe_acc']:.4f} fine-tune {row['fine_tune_acc']:.4f}",
                  flush=True)
        eval_s = time.perf_counter() - t
        ray.shutdown()

    table = {}
    for m in cfg.methods:
        mine = [r for r in rows if r["method"] == m]
        lp, ft = summarize([r["linear_probe_acc"] for r in mine]), summarize([r["fine_tune_acc"] for r in mine])
        table[m] = {"linear_mean": round(lp["mean"], 4), "linear_std": round(lp["std"], 4),
                    "finetune_mean": round(ft["mean"], 4), "finetune_std": round(ft["std"], 4)}
    baselines = [m for m in table if m not in ("krr-st", "teacher")]
    goal = {k: all(table["krr-st"][f"{k}_mean"] > table[b][f"{k}_mean"] for b in baselines)
            for k in ("linear", "finetune")} if "krr-st" in table else {}
    print(json.dumps({
        "benchmark": "krr_st",
        "preset": args.preset,
        "overrides": args.set,
        "source_images": len(x),
        "synthetic_images": cfg.krr.num_images,
        "pool_mode": cfg.krr.pool_mode,
        "outer_steps": cfg.krr.outer_steps,
        "seconds_per_outer_step": {str(n): round(s, 4) for n, s in steps.items()},
        "teacher_seconds": round(teacher_s, 1),
        "teacher_loss": round(summary["loss"], 3),
        "distill_seconds": round(distill_s, 1),
        "outer_loss_first_last_50": [round(statistics.mean(losses[:50]), 5), round(statistics.mean(losses[-50:]), 5)],
        "eval_seconds": round(eval_s, 1),
        "seeds": cfg.seeds,
        "target_accuracy": table,
        "krr_st_beats_every_baseline_but_teacher": goal,
        "wall_seconds": round(time.perf_counter() - wall, 1),
    }))


if __name__ == "__main__":
    main()

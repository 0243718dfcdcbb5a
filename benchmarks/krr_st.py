"""Benchmark: KRR-ST against its baselines and against its own starting point, Tiny-ImageNet-200 -> CIFAR-10.

    .venv/bin/python benchmarks/krr_st.py --preset cpu     # the distill-krr/cpu preset + the budget curve
    .venv/bin/python benchmarks/krr_st.py --preset tiny    # the tiny preset, about a minute
    .venv/bin/python benchmarks/krr_st.py --preset cpu --set krr.outer_steps=2000 --budgets 50 100 --steps 400

Settings come from the `distill-krr` flow preset of the same name (deployments/presets/), so the
numbers are what `prefect deployment run 'distill-krr/cpu'` produces, computed with the same core
functions (distill.ssl, distill.krr, distill.transfer) without the Prefect/artifact layer:

1. Step cost: seconds per outer step (one KRR solve + its backward + one online pool step) with
   100, 500 and 1000 synthetic images on one thread, median over steps.
2. Comparison: teacher -> distilled set -> every method x seed (one Ray task each, one CPU):
   pretrain a fresh student, then linear probe and fine-tune on the target (distill.transfer).
3. The question the paper's baselines leave open: does the bilevel optimization add anything over
   its starting point, the same random real images with the teacher's representations
   ("random-real-targets", KRR-ST at step 0)? Linear probe of KRR-ST and of that step-0 set at
   several budgets (--budgets, at the preset's outer steps) and several outer-step counts
   (--steps, at the preset's budget), paired per seed.

Differences are in points (mean +- std over seeds, paired by seed). Goals:
  goal_teacher_beats_no_pretrain_by_8_lp       the regime: the teacher is worth distilling
  goal_krr_beats_random_ce_by_3_lp             the paper's "Random" baseline (CE on the true labels)
  goal_krr_beats_step0_by_2_lp_at_some_budget  the bilevel optimization adds something
Appends to benchmarks/records/krr_st.jsonl (benchmarks/records.py); the last line of output is JSON.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.records import append_record, loadavg  # noqa: E402
from benchmarks.transfer_regime import apply_overrides  # noqa: E402
from distill.krr import METHODS, krr_distill, pretrained_backbone, representations  # noqa: E402
from distill.ssl import load_teacher, train_teacher  # noqa: E402
from distill.transfer import transfer  # noqa: E402
from distill.transforms import Preprocessor  # noqa: E402
from flows.distill_krr import DistillKRRConfig  # noqa: E402
from flows.presets import load_preset  # noqa: E402

STEP_SIZES = {"cpu": (100, 500, 1000), "tiny": (6, 12, 24)}
CURVE = {"cpu": {"budgets": (20, 50, 100, 200), "steps": (1600,)}, "tiny": {"budgets": (3, 6), "steps": (2,)}}


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


def _distill(n: int, steps: int, cfg_json: str, x: torch.Tensor, teacher_path: str) -> dict:
    """One KRR-ST run at (budget, outer steps): the set, its step-0 indices and its loss."""
    torch.set_num_threads(1)
    cfg = DistillKRRConfig.model_validate_json(cfg_json)
    krr = cfg.krr.model_copy(update={"num_images": n, "outer_steps": steps})
    start = time.perf_counter()
    result = krr_distill(krr, x, load_teacher(teacher_path), device="cpu")
    return {
        "n": n,
        "steps": steps,
        "images": result.images,
        "targets": result.targets,
        "indices": result.source_indices,
        "seconds": time.perf_counter() - start,
        "loss_first_last": [result.history[0]["loss"], result.history[-1]["loss"]],
    }


def _evaluate(
    method: str,
    seed: int,
    cfg_json: str,
    data: dict,
    teacher_path: str,
    modes: list[str] | None = None,
    tag: dict | None = None,
) -> dict:
    """Pretrain per `method` on `data` (the set, or its step-0 images), then transfer; one row."""
    torch.set_num_threads(1)
    cfg = DistillKRRConfig.model_validate_json(cfg_json)
    recipe = cfg.transfer if modes is None else cfg.transfer.model_copy(update={"modes": modes})
    teacher = load_teacher(teacher_path) if METHODS[method].data in ("initial", "teacher") else None
    images, targets, labels = data.get("images"), data.get("targets"), data.get("labels")
    if METHODS[method].data == "initial":
        images = data["initial"]
        targets = representations(teacher, images)
    shape = tuple(data["target"][0].shape[1:])
    backbone, info = pretrained_backbone(
        method,
        recipe,
        image_shape=shape,
        images=images,
        targets=targets,
        labels=labels,
        teacher=teacher,
        seed=seed,
        device="cpu",
    )
    start = time.perf_counter()
    row = transfer(backbone, *data["target"], recipe, num_classes=data["num_classes"], seed=seed, device="cpu")
    return {
        "method": method,
        "seed": seed,
        **(tag or {}),
        **row,
        **info,
        "transfer_seconds": time.perf_counter() - start,
    }


def points(values: list[float]) -> dict:
    return {
        "mean": round(100 * statistics.mean(values), 1),
        "std": round(100 * statistics.stdev(values), 1) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def paired(a: list[dict], b: list[dict], key: str) -> dict | None:
    """a minus b per seed, in points."""
    va, vb = {r["seed"]: r[key] for r in a}, {r["seed"]: r[key] for r in b}
    seeds = sorted(set(va) & set(vb))
    return points([va[s] - vb[s] for s in seeds]) if seeds else None


def verdict(d: dict | None, bar: float) -> str:
    if d is None:
        return "not measured"
    if d["mean"] >= bar:
        return "gain"
    return "no gain" if abs(d["mean"]) <= max(d["std"], 1.0) else ("loss" if d["mean"] < 0 else "small gain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(STEP_SIZES), default="cpu")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset value by dotted key, e.g. --set krr.outer_steps=2000 (YAML value)",
    )
    parser.add_argument("--budgets", type=int, nargs="*", help="curve: synthetic image counts (at the preset's steps)")
    parser.add_argument("--steps", type=int, nargs="*", help="curve: outer-step counts (at the preset's budget)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records")
    args = parser.parse_args()
    load_start = loadavg()
    cfg = DistillKRRConfig(**_resolve(apply_overrides(load_preset("distill-krr", args.preset), args.set)))
    for block in (cfg.source, cfg.target):
        if not Path(block.source).exists():
            sys.exit(f"{block.source} not found; place ../shared/data beside the repo or set the preset's paths")
    budgets = args.budgets if args.budgets is not None else CURVE[args.preset]["budgets"]
    steps_list = args.steps if args.steps is not None else CURVE[args.preset]["steps"]
    torch.set_num_threads(1)
    wall = time.perf_counter()

    source = cfg.source.load(cfg.source.train_split)
    x = Preprocessor.fit(source.images)(source.images)
    target_train, target_test = cfg.target.load(cfg.target.train_split), cfg.target.load(cfg.target.test_split)
    tpre = Preprocessor.fit(target_train.images)
    too_big = [n for n in [*budgets, cfg.krr.num_images] if n > len(x)]
    if too_big:
        sys.exit(f"budgets {too_big} exceed the {len(x)} source images")
    print(f"source {tuple(x.shape)}, target {len(target_train)} train / {len(target_test)} test", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = train_teacher(
            cfg.teacher,
            x,
            out_dir=tmp,
            device="cpu",
            progress=lambda s, n, **m: print(f"teacher epoch {s}/{n} loss {m['loss']:.2f}", flush=True),
        )
        teacher_s = time.perf_counter() - t
        teacher = load_teacher(summary["path"])

        steps = {}
        for n in STEP_SIZES[args.preset]:
            steps[n] = step_seconds(cfg, x, teacher, min(n, len(x)))
            print(f"outer step with {n} synthetic images: {steps[n]:.3f} s", flush=True)

        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg_json = cfg.model_dump_json()
        x_ref = ray.put(x)
        target = (tpre(target_train.images), target_train.labels, tpre(target_test.images), target_test.labels)
        distill_remote = ray.remote(num_cpus=1)(_distill)
        # the preset's set first (the comparison needs it), the curve's other points beside the evaluations
        points_wanted = [(cfg.krr.num_images, cfg.krr.outer_steps)]
        points_wanted += [(n, cfg.krr.outer_steps) for n in budgets if n != cfg.krr.num_images]
        points_wanted += [(cfg.krr.num_images, s) for s in steps_list if s != cfg.krr.outer_steps]
        sets_f = {p: distill_remote.remote(p[0], p[1], cfg_json, x_ref, summary["path"]) for p in points_wanted}
        main = ray.get(sets_f[points_wanted[0]])
        print(
            f"KRR-ST {main['n']} images x {main['steps']} steps: {main['seconds']:.0f} s, loss "
            f"{main['loss_first_last'][0]:.4g} -> {main['loss_first_last'][1]:.4g}",
            flush=True,
        )

        def data_of(s: dict):
            return ray.put(
                {
                    "images": s["images"],
                    "targets": s["targets"],
                    "labels": source.labels[s["indices"]],
                    "initial": x[s["indices"]],
                    "num_classes": len(target_train.class_names),
                    "target": target,
                }
            )

        remote = ray.remote(num_cpus=1)(_evaluate)
        t = time.perf_counter()
        main_data = data_of(main)
        futures = [
            remote.remote(m, s, cfg_json, main_data, summary["path"]) for m in cfg.methods for s in range(cfg.seeds)
        ]
        curve_sets = {p: ray.get(f) for p, f in sets_f.items() if p != points_wanted[0]}
        step0_done = {cfg.krr.num_images}
        for (n, st), s in curve_sets.items():
            d = data_of(s)
            tag = {"n": n, "steps": st, "distill_seconds": round(s["seconds"], 1)}
            futures += [
                remote.remote("krr-st", seed, cfg_json, d, summary["path"], ["linear_probe"], {**tag, "curve": True})
                for seed in range(cfg.seeds)
            ]
            if n not in step0_done:  # the step-0 set depends on the budget only
                step0_done.add(n)
                futures += [
                    remote.remote(
                        "random-real-targets",
                        seed,
                        cfg_json,
                        d,
                        summary["path"],
                        ["linear_probe"],
                        {"n": n, "steps": 0, "curve": True},
                    )
                    for seed in range(cfg.seeds)
                ]
        rows, pending = [], futures
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            row = ray.get(done[0])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("seconds")}), flush=True)
        eval_s = time.perf_counter() - t
        ray.shutdown()

    main_rows = [r for r in rows if not r.get("curve")]
    table = {}
    for m in cfg.methods:
        mine = [r for r in main_rows if r["method"] == m]
        table[m] = {mode: points([r[f"{mode}_acc"] for r in mine]) for mode in ("linear_probe", "fine_tune")}

    def rows_of(method: str, n: int, st: int | None) -> list[dict]:
        if n == cfg.krr.num_images and st in (None, cfg.krr.outer_steps, 0):
            return [r for r in main_rows if r["method"] == method]
        return [
            r
            for r in rows
            if r.get("curve") and r["method"] == method and r["n"] == n and (st is None or r["steps"] == st)
        ]

    curve = []
    for n, st in [(cfg.krr.num_images, cfg.krr.outer_steps), *curve_sets]:
        krr, step0 = rows_of("krr-st", n, st), rows_of("random-real-targets", n, 0)
        d = paired(krr, step0, "linear_probe_acc")
        curve.append(
            {
                "images": n,
                "outer_steps": st,
                "krr_lp": points([r["linear_probe_acc"] for r in krr]),
                "step0_lp": points([r["linear_probe_acc"] for r in step0]),
                "krr_minus_step0_lp": d,
            }
        )
    curve.sort(key=lambda c: (c["images"], c["outer_steps"]))

    def diff(a: str, b: str, mode: str = "linear_probe") -> dict | None:
        if a not in cfg.methods or b not in cfg.methods:
            return None
        return paired(
            [r for r in main_rows if r["method"] == a], [r for r in main_rows if r["method"] == b], f"{mode}_acc"
        )

    differences = {
        f"{a} - {b}": {mode: diff(a, b, mode) for mode in ("linear_probe", "fine_tune")}
        for a, b in (
            ("teacher", "no-pretrain"),
            ("krr-st", "random-real-ce"),
            ("krr-st", "random-real-targets"),
            ("krr-st", "no-pretrain"),
        )
    }
    teacher_gap = differences["teacher - no-pretrain"]["linear_probe"]
    random_gap = differences["krr-st - random-real-ce"]["linear_probe"]
    best = max(
        (c for c in curve if c["krr_minus_step0_lp"]), key=lambda c: c["krr_minus_step0_lp"]["mean"], default=None
    )
    goals = {
        "goal_teacher_beats_no_pretrain_by_8_lp": bool(teacher_gap and teacher_gap["mean"] >= 8),
        "goal_krr_beats_random_ce_by_3_lp": bool(random_gap and random_gap["mean"] >= 3),
        "goal_krr_beats_step0_by_2_lp_at_some_budget": bool(best and best["krr_minus_step0_lp"]["mean"] >= 2),
    }
    verdicts = [
        f"{name}: "
        + "; ".join(f"{mode.replace('_', ' ')} {d['mean']:+.1f} +- {d['std']:.1f}" for mode, d in ds.items() if d)
        + f": {verdict(ds['linear_probe'], {'teacher - no-pretrain': 8, 'krr-st - random-real-ce': 3}.get(name, 2))}"
        for name, ds in differences.items()
        if ds["linear_probe"]
    ]
    verdicts += [
        f"KRR-ST {c['images']} images x {c['outer_steps']} steps vs its step-0 set: linear probe "
        f"{c['krr_minus_step0_lp']['mean']:+.1f} +- {c['krr_minus_step0_lp']['std']:.1f}: "
        f"{verdict(c['krr_minus_step0_lp'], 2)}"
        for c in curve
        if c["krr_minus_step0_lp"]
    ]
    out = {
        "benchmark": "krr_st",
        "preset": args.preset,
        "overrides": args.set,
        "source_images": len(x),
        "target": f"{len(target_train)} train / {len(target_test)} test",
        "synthetic_images": cfg.krr.num_images,
        "pool_mode": cfg.krr.pool_mode,
        "outer_steps": cfg.krr.outer_steps,
        "seconds_per_outer_step": {str(n): round(s, 4) for n, s in steps.items()},
        "teacher_seconds": round(teacher_s, 1),
        "teacher_loss": round(summary["loss"], 3),
        "distill_seconds": round(main["seconds"], 1),
        "outer_loss_first_last": [round(v, 5) for v in main["loss_first_last"]],
        "eval_seconds": round(eval_s, 1),
        "seeds": cfg.seeds,
        "accuracy_points": table,
        "differences_points": differences,
        "step0_curve": curve,
        "goals": goals,
        "verdicts": verdicts,
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "wall_note": "upper bound when loadavg exceeds the 2 cores (other processes shared them)",
    }
    if not args.no_record:
        append_record("krr_st", out, preset=args.preset, loadavg_start=load_start, overrides=args.set)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Benchmark: DP4TL source pruning, Tiny-ImageNet-200 (32 px) -> CIFAR-10, through the real `prune-eval` flow.

    .venv/bin/python benchmarks/dp4tl.py --preset cpu     # ~15 min on 2 idle cores
    .venv/bin/python benchmarks/dp4tl.py --preset tiny    # about a minute (flow start-up included)

Runs `flows.prune.prune_eval` in-process with the preset of the same name in
deployments/presets/prune-eval.yaml, on a fresh store so nothing is a cache hit (a Prefect server
is started on a free loopback port unless PREFECT_API_URL is set). The cpu preset is the regime
where source pretraining matters (benchmarks/transfer_regime.py): Tiny-ImageNet at 100 images
per class, CIFAR-10 with 20 labelled images per class; label mapping (LM), feature mapping over
K-means clusters (FM, label-free), random and bottom-K class pruning at 50/80/90%, 3 seeds, each
pretrained for the same epoch budget (so a pruned source costs its kept fraction of the time)
and judged by linear probe and fine-tune, next to the full source and no pretraining.

Reported: the surrogate's held-out source accuracy, the source classes LM keeps first (and
last), accuracy per (method, ratio) with spreads over seeds, each method's paired difference to
the full source and to random pruning in points (mean +- std over seeds), and the goals:
  goal_full_beats_scratch_*             the regime: full source >= no pretraining + 5 points
  goal_{lm,fm_kmeans}_50_*_within_1     at 50% pruning, within 1 point of the full source
  goal_lm_80_*_beats_random_by_2        at 80% pruning, LM >= random pruning + 2 points
  goal_*_50_time_close_to_kept          pretraining time / full within 0.15 of the kept image fraction
Appends to benchmarks/records/dp4tl.jsonl (benchmarks/records.py); the last output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DISTILLERY_DATA", REPO.parent / "shared" / "data"))
PRESETS = ("cpu", "tiny")  # names in deployments/presets/prune-eval.yaml
FM = "fm_kmeans"  # the label-free feature mapping the issue asks for
TIME_TOLERANCE = 0.15  # |pretraining time / full - kept image fraction| that counts as "close"

from benchmarks.records import append_record, loadavg  # noqa: E402


def _start_prefect_server(home: Path) -> subprocess.Popen | None:
    """A private Prefect server (SQLite under `home`) unless one is configured; env set for Ray workers too."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(os.environ["PREFECT_API_URL"] + "/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the Prefect server did not start within 180 s")


def points(values: list[float]) -> dict:
    """Mean and sample std of accuracy fractions (or their differences), in points, one decimal."""
    return {
        "mean": round(100 * statistics.mean(values), 1),
        "std": round(100 * statistics.stdev(values), 1) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def paired(rows: list[dict], a: tuple[str, float], b: tuple[str, float], key: str) -> dict | None:
    """a minus b per seed (the same seeds on both sides), in points."""
    va = {r["seed"]: r[key] for r in rows if (r["method"], r["ratio"]) == a}
    vb = {r["seed"]: r[key] for r in rows if (r["method"], r["ratio"]) == b}
    seeds = sorted(set(va) & set(vb))
    return points([va[s] - vb[s] for s in seeds]) if seeds else None


MODES = (("linear_probe_acc", "lp"), ("fine_tune_acc", "ft"))


def comparisons(rows: list[dict], ratios: list[float]) -> dict:
    """Per (method, ratio): paired difference to the full source and to random pruning, in points."""
    out = {}
    for method in sorted({r["method"] for r in rows} - {"full", "scratch"}):
        for ratio in ratios:
            entry = {}
            for key, short in MODES:
                vs_full = paired(rows, (method, ratio), ("full", 0.0), key)
                if vs_full is None:
                    continue
                entry[f"{short}_minus_full"] = vs_full
                if method != "random":
                    entry[f"{short}_minus_random"] = paired(rows, (method, ratio), ("random", ratio), key)
            if entry:
                out[f"{method}@{ratio}"] = entry
    for key, short in MODES:
        gap = paired(rows, ("full", 0.0), ("scratch", 0.0), key)
        if gap is not None:
            out.setdefault("full@0.0", {})[f"{short}_minus_scratch"] = gap
    return out


def goals(summary: list[dict], diffs: dict) -> dict:
    by = {(s["method"], s["ratio"]): s for s in summary}
    out: dict = {}
    full = by.get(("full", 0.0))
    if full is None:
        return out
    for _key, short in MODES:
        gap = diffs.get("full@0.0", {}).get(f"{short}_minus_scratch")
        if gap is not None:
            out[f"goal_full_beats_scratch_{short}_by_5_points"] = gap["mean"] >= 5.0
        for m in ("lm", FM):
            d = diffs.get(f"{m}@0.5", {}).get(f"{short}_minus_full")
            if d is not None:
                out[f"goal_{m}_50_{short}_within_1_point_of_full"] = d["mean"] >= -1.0
        d = diffs.get("lm@0.8", {}).get(f"{short}_minus_random")
        if d is not None:
            out[f"goal_lm_80_{short}_beats_random_by_2_points"] = d["mean"] >= 2.0
    for m in ("lm", FM):
        s = by.get((m, 0.5))
        if s is not None:
            kept = s["train_images"] / full["train_images"]
            out[f"goal_{m}_50_time_close_to_kept"] = abs(s["pretrain_time_vs_full"] - kept) <= TIME_TOLERANCE
    return out


def verdicts(diffs: dict) -> list[str]:
    """One line per compared method and ratio: the differences with spreads, and what they mean."""
    lines = []
    for name, entry in diffs.items():
        parts = []
        for label, key, _bar in (
            ("full", "minus_full", -1.0),
            ("random", "minus_random", 0.0),
            ("no pretraining", "minus_scratch", 0.0),
        ):
            for _, short in MODES:
                d = entry.get(f"{short}_{key}")
                if d is not None:
                    parts.append(f"{short} {d['mean']:+.1f} +- {d['std']:.1f} vs {label}")
        if not parts:
            continue
        lp_full = entry.get("lp_minus_full")
        lp_rand = entry.get("lp_minus_random")
        if name == "full@0.0":
            verdict = "the source matters" if entry["lp_minus_scratch"]["mean"] >= 5 else "the source barely matters"
        elif lp_rand is not None and abs(lp_rand["mean"]) <= max(lp_rand["std"], 1.0):
            verdict = "no gain over random pruning"
        elif lp_rand is not None and lp_rand["mean"] > 0:
            verdict = "better than random pruning" + (
                ", as good as the full source" if lp_full and lp_full["mean"] >= -1 else ""
            )
        else:
            verdict = "worse than random pruning" if lp_rand is not None else ""
        lines.append(f"{name}: {'; '.join(parts)}" + (f": {verdict}" if verdict else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--store", default=None, help="artifact store (default: a fresh temporary directory)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records")
    args = parser.parse_args()
    for name in ("tiny-imagenet-200", "cifar10"):
        if not (DATA / name).exists():
            sys.exit(f"{name} not found under {DATA}; set DISTILLERY_DATA")
    load_start = loadavg()
    work = Path(tempfile.mkdtemp(prefix="dp4tl-bench-"))
    server = _start_prefect_server(work / "prefect")
    try:
        import torch

        from distill.train import evaluate
        from flows.presets import load_preset
        from flows.prune import PruneEvalConfig, prune_eval
        from tasks.artifacts import ArtifactRef
        from tasks.datasets import preprocessed
        from tasks.prune import class_table, load_surrogate_net
        from tasks.store import ArtifactStore

        torch.set_num_threads(1)
        params = load_preset("prune-eval", args.preset)
        # Data paths in presets are relative to the project root.
        for side in ("source", "target"):
            params[side] = {**params[side], "source": str(DATA / Path(params[side]["source"]).name)}
        store = args.store or str(work / "store")
        cfg = PruneEvalConfig(**{**params, "store": store})
        start = time.perf_counter()
        result = prune_eval(cfg)
        wall = time.perf_counter() - start

        st = ArtifactStore(store)
        (sur_key,) = st.list("surrogate")
        sur_manifest = st.manifest("surrogate", sur_key)
        source_ref = ArtifactRef(store=store, stage="dataset", key=sur_manifest["inputs"][0])
        test_x, test_y, _ = preprocessed(source_ref, "test")
        surrogate_acc = evaluate(
            load_surrogate_net(ArtifactRef(store=store, stage="surrogate", key=sur_key)), test_x, test_y, device="cpu"
        )["acc"]
        classes = {}
        for label, uri in result["selections"].items():
            method, _, seed = label.partition("/seed")
            if method in ("lm", FM) and seed == str(cfg.selection.seeds[0]):
                table = class_table(ArtifactRef(store=store, stage="selection", key=uri.rsplit("/", 1)[-1]), 10)
                classes[method] = {
                    end: [f"{r['name']} ({r['votes']})" for r in table if r["end"] == end] for end in ("top", "bottom")
                }
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)  # the Prefect home, and the store unless --store was given
    summary, rows = result["summary"], result["rows"]
    diffs = comparisons(rows, cfg.selection.ratios)
    table = {}
    for s in summary:
        entry = {
            "seeds": s["seeds"],
            "train_images": s["train_images"],
            "pretrain_seconds": round(s["pretrain_seconds"], 1),
            "pretrain_time_vs_full": round(s["pretrain_time_vs_full"], 3),
        }
        for key, short in MODES:
            if f"{key}_mean" in s:
                entry[short] = f"{100 * s[f'{key}_mean']:.1f} +- {100 * s[f'{key}_std']:.1f}"
        table[f"{s['method']}@{s['ratio']}"] = entry
    out = {
        "benchmark": "dp4tl",
        "preset": args.preset,
        "source": f"{cfg.source.name} {cfg.source.train_per_class or 'all'}/class @ {cfg.source.image_size}px",
        "target": f"{cfg.target.name} {cfg.target.train_per_class or 'all'}/class train, "
        f"{cfg.target.test_per_class or 'all'}/class test",
        "seeds": len(cfg.selection.seeds),
        "pretrain_epochs": cfg.transfer.pretrain.epochs,
        "surrogate_source_test_acc": round(100 * surrogate_acc, 1),
        "surrogate_train_s": sur_manifest.get("train_seconds"),
        "kept_classes_first": classes,
        "wall_s": round(wall, 1),
        "wall_note": "upper bound when loadavg exceeds the 2 cores (other processes shared them)",
        "goals": goals(summary, diffs),
        "verdicts": verdicts(diffs),
        "accuracy": table,
        "differences_points": diffs,
    }
    if not args.no_record:
        append_record("dp4tl", out, preset=args.preset, loadavg_start=load_start)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Benchmark: DP4TL source pruning, Tiny-ImageNet-200 (32 px) -> CIFAR-10, through the real `prune-eval` flow.

    .venv/bin/python benchmarks/dp4tl.py --preset cpu     # a few minutes on 2 quiet cores
    .venv/bin/python benchmarks/dp4tl.py --preset tiny    # about a minute (flow start-up included)

Runs `flows.prune.prune_eval` in-process with the preset of the same name in
deployments/presets/prune-eval.yaml (cpu: full source, label mapping, feature mapping, random
and bottom-K class pruning at 50% and 80%, 3 seeds, each pretrained for the same epoch budget
and transferred by linear probe and fine-tune, plus no pretraining), on a fresh store so nothing
is a cache hit. A Prefect server is started on a free loopback port unless PREFECT_API_URL is set.

The issue's goal, checked in `goals`: at 50% pruning, LM and FM within 1 point of full-source
pretraining and above random pruning; pretraining time close to the kept fraction of the full
run. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
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


def _start_prefect_server(home: Path) -> subprocess.Popen | None:
    """A private Prefect server (SQLite under `home`) unless one is configured; env set for Ray workers too."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
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


def _goals(summary: list[dict]) -> dict:
    by = {(s["method"], s["ratio"]): s for s in summary}
    full = by.get(("full", 0.0))
    out = {}
    if full is None:
        return out
    for m in ("lm", "fm"):
        s, rnd = by.get((m, 0.5)), by.get(("random", 0.5))
        if s is None:
            continue
        for k in ("linear_probe_acc", "fine_tune_acc"):
            gap = 100 * (s[f"{k}_mean"] - full[f"{k}_mean"])
            out[f"{m}_50_{k}_minus_full_points"] = round(gap, 2)
            out[f"{m}_50_{k}_within_1_point_of_full"] = gap >= -1.0
            if rnd is not None:
                out[f"{m}_50_{k}_above_random"] = s[f"{k}_mean"] > rnd[f"{k}_mean"]
        out[f"{m}_50_pretrain_time_vs_full"] = round(s["pretrain_time_vs_full"], 3)
        out[f"{m}_50_kept_image_fraction"] = round(s["train_images"] / full["train_images"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--store", default=None, help="artifact store (default: a fresh temporary directory)")
    args = parser.parse_args()
    for name in ("tiny-imagenet-200", "cifar10"):
        if not (DATA / name).exists():
            sys.exit(f"{name} not found under {DATA}; set DISTILLERY_DATA")
    work = Path(tempfile.mkdtemp(prefix="dp4tl-bench-"))
    server = _start_prefect_server(work / "prefect")
    try:
        from flows.presets import load_preset
        from flows.prune import PruneEvalConfig, prune_eval
        from tasks.store import ArtifactStore

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
        surrogate_s = [st.manifest("surrogate", k).get("train_seconds", 0.0) for k in st.list("surrogate")]
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)  # the Prefect home, and the store unless --store was given
    summary = result["summary"]
    results = {
        f"{s['method']}@{s['ratio']}": {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in s.items() if k not in ("method", "ratio")
        }
        for s in summary
    }
    print(json.dumps({
        "benchmark": "dp4tl",
        "preset": args.preset,
        "source": f"{cfg.source.name} {cfg.source.train_per_class or 'all'}/class @ {cfg.source.image_size}px",
        "target": f"{cfg.target.name} {cfg.target.train_per_class or 'all'}/class",
        "seeds": len(cfg.selection.seeds),
        "pretrain_epochs": cfg.pretrain.train.epochs,
        "wall_s": round(wall, 1),
        "surrogate_train_s": round(sum(surrogate_s), 1),
        "cpus": os.cpu_count(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "goals": _goals(summary),
        "results": results,
    }))


if __name__ == "__main__":
    main()

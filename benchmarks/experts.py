"""Benchmark: expert throughput with 1 and 2 parallel Ray tasks, bytes per expert, snapshot load time.

    .venv/bin/python benchmarks/experts.py --preset cpu     # ~5 min on 2 cores
    .venv/bin/python benchmarks/experts.py --preset tiny    # seconds

Experts train exactly as in the `experts` flow (distill.experts.train_expert on the
preprocessed dataset), as plain Ray tasks with num_cpus=1 each and torch pinned to one
thread, first one at a time, then two at a time. Experts per hour counts completed experts
over wall time. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.data import DataConfig  # noqa: E402
from distill.experts import ExpertConfig, train_expert  # noqa: E402
from distill.trajectory import TrajectoryReader, expert_file  # noqa: E402
from distill.transforms import Preprocessor  # noqa: E402

DATA = Path(os.environ.get("DISTILLERY_DATA", REPO.parent / "shared" / "data"))

PRESETS = {
    # The experts/cpu flow preset's setting: 10k CIFAR-10 images, ConvNet width 32, depth 3.
    "cpu": {"per_class": 1000, "test_per_class": 200, "width": 32, "depth": 3, "epochs": 2, "experts": 2},
    "tiny": {"per_class": 50, "test_per_class": 20, "width": 8, "depth": 2, "epochs": 2, "experts": 2},
}


def _run_expert(cfg: dict, train, test, num_classes: int, expert_id: int, out_dir: str) -> dict:
    torch.set_num_threads(1)
    expert = ExpertConfig(**cfg)
    summary = train_expert(
        expert,
        *train,
        *test,
        num_classes=num_classes,
        expert_id=expert_id,
        out_path=Path(out_dir) / expert_file(expert_id),
    )
    return {"seconds": summary["seconds"], "path": summary["path"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--recipe", default="mtt", help="expert recipe (mtt, ast, sam)")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    if not (DATA / "cifar10").exists():
        sys.exit(f"CIFAR-10 not found under {DATA}; set DISTILLERY_DATA")

    import ray

    data = DataConfig(source=str(DATA / "cifar10"), train_per_class=p["per_class"], test_per_class=p["test_per_class"])
    train_set, test_set = data.load("train"), data.load("test")
    pre = Preprocessor.fit(train_set.images)
    train = (pre(train_set.images), train_set.labels)
    test = (pre(test_set.images), test_set.labels)
    cfg = {
        "recipe": args.recipe,
        "net": "convnet",
        "net_kwargs": {"width": p["width"], "depth": p["depth"]},
        "epochs": p["epochs"],
        "num_experts": p["experts"],
    }

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_run_expert)
    train_ref, test_ref = ray.put(train), ray.put(test)
    classes = len(train_set.class_names)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Warm both workers (imports) so the timings measure training, not process start-up.
        ray.get([remote.remote({**cfg, "epochs": 1}, train_ref, test_ref, classes, 90 + i, tmp) for i in range(2)])
        for parallel in (1, 2):
            out = Path(tmp) / f"p{parallel}"
            out.mkdir()
            start = time.perf_counter()
            done = []
            for batch in range(0, p["experts"] * parallel, parallel):
                ids = range(batch, batch + parallel)
                done += ray.get([remote.remote(cfg, train_ref, test_ref, classes, i, str(out)) for i in ids])
            wall = time.perf_counter() - start
            results[parallel] = {
                "experts": len(done),
                "wall_s": wall,
                "per_expert_s": statistics.mean(d["seconds"] for d in done),
            }
            print(f"{parallel} in parallel: {len(done)} experts in {wall:.1f} s", flush=True)
        path = Path(done[0]["path"])
        size = path.stat().st_size
        with TrajectoryReader(path) as reader:
            loads = []
            for _ in range(20):
                t = time.perf_counter()
                reader.snapshot(reader.last_epoch)
                loads.append(time.perf_counter() - t)
            num_params, snapshots = reader.num_params, reader.num_snapshots
    ray.shutdown()
    print(
        json.dumps(
            {
                "benchmark": "experts",
                "preset": args.preset,
                "recipe": args.recipe,
                "epochs_per_expert": p["epochs"],
                "train_images": len(train_set),
                "experts_per_hour_1_task": round(3600 * results[1]["experts"] / results[1]["wall_s"], 1),
                "experts_per_hour_2_tasks": round(3600 * results[2]["experts"] / results[2]["wall_s"], 1),
                "seconds_per_expert_1_task": round(results[1]["per_expert_s"], 2),
                "seconds_per_expert_2_tasks": round(results[2]["per_expert_s"], 2),
                "bytes_per_expert": size,
                "snapshots_per_expert": snapshots,
                "num_params": num_params,
                "snapshot_load_ms_median": round(1000 * statistics.median(loads), 3),
            }
        )
    )


if __name__ == "__main__":
    main()

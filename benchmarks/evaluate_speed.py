"""Evaluation throughput: nets per minute, one by one vs trained together (distill.batched).

The evaluation protocol trains N fresh nets per setting on the same small set (MTT: 5 ConvNets,
1000 epochs each on 10 x ipc images). `distill.evaluate.evaluate_seeds(batched=True)` trains
them in one vmapped step; this compares it with one by one for 1, 3 and 5 nets, interleaved in
one process (order reversed every other round), on a fixed random problem: 10 classes x ipc
3x32x32 images, MTT's evaluation ConvNet (instance norm, DSA), `epochs` epochs, tested on 500
images. It also checks that both ways give the same test accuracies per seed.

    .venv/bin/python benchmarks/evaluate_speed.py --preset tiny     # seconds
    .venv/bin/python benchmarks/evaluate_speed.py --preset cpu      # ~3 min on 2 loaded cores
Last line: one JSON object; every run is appended to benchmarks/records/evaluate_speed.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import append_flat_record, loadavg  # noqa: E402
from benchmarks.speed_common import interleaved, paired_ratio, timing_summary  # noqa: E402

PRESETS = {
    "tiny": {"width": 8, "ipc": 1, "epochs": 2, "nets": [1, 3], "rounds": 1, "threads": 1},
    "cpu": {"width": 128, "ipc": 10, "epochs": 5, "nets": [1, 3, 5], "rounds": 2, "threads": 1},
    "gpu": {"width": 128, "ipc": 50, "epochs": 100, "nets": [1, 3, 5], "rounds": 2, "threads": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records (smoke tests)")
    args = parser.parse_args()
    import torch

    from distill.evaluate import EvalConfig, evaluate_seeds
    from distill.train import TrainConfig

    p = PRESETS[args.preset]
    torch.set_num_threads(p["threads"])
    load_start = loadavg()
    print(f"preset {args.preset}, torch threads {torch.get_num_threads()}, loadavg {load_start}", flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10 * p["ipc"], 3, 32, 32, generator=g)
    y = torch.arange(10).repeat_interleave(p["ipc"])
    test_x, test_y = torch.randn(500, 3, 32, 32, generator=g), torch.randint(10, (500,), generator=g)
    cfg = EvalConfig(
        net_kwargs={"width": p["width"], "depth": 3, "norm": "instance"},
        train=TrainConfig(epochs=p["epochs"], batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4, augment="dsa"),
    )
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    rows, accs = [], {}
    for k in p["nets"]:
        seeds = list(range(k))

        def run(batched: bool, seeds=seeds):
            out = evaluate_seeds(
                x, y, test_x, test_y, cfg, num_classes=10, seeds=seeds, device=args.device, batched=batched
            )
            accs[(len(seeds), batched)] = [r["test_acc"] for r in out]

        times = interleaved({"sequential": lambda: run(False), "batched": lambda: run(True)}, p["rounds"], sync=sync)
        row = {
            "nets": k,
            "batched_vs_sequential_time": paired_ratio(times, "batched", "sequential"),
            "same_test_acc": accs[(k, True)] == accs[(k, False)],
            "test_acc": accs[(k, False)],
        }
        for name in times:
            row[name] = {
                **timing_summary(times[name]),
                "nets_per_minute": round(60 * k / timing_summary(times[name])["s_median"], 2),
            }
        rows.append(row)
        print(
            f"{k} net(s): sequential {row['sequential']['nets_per_minute']:.2f} nets/min, batched "
            f"{row['batched']['nets_per_minute']:.2f} nets/min (time ratio {row['batched_vs_sequential_time']}), "
            f"same accuracies: {row['same_test_acc']}",
            flush=True,
        )
    summary = {
        "benchmark": "evaluate_speed",
        "device": args.device,
        "setting": {
            "images": f"10x{p['ipc']} 3x32x32",
            "net": f"convnet w{p['width']} d3 instance",
            "dsa": True,
            "epochs": p["epochs"],
            "test_images": 500,
        },
        "rows": rows,
        "threads_used": p["threads"],
        "goal_batched_faster_at_5_nets": rows[-1]["batched_vs_sequential_time"] < 1.0,
        "goal_same_accuracies": all(r["same_test_acc"] for r in rows),
    }
    if not args.no_record:
        append_flat_record(
            "evaluate_speed", summary, preset=args.preset, threads=p["threads"], loadavg_start=load_start
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

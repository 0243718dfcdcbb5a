"""Seconds per matching iteration and peak memory, `unrolled` vs `constant`, at syn_steps 10/20/40/80.

Fixed small setting (random tensors, no data needed): 10 classes of 3x32x32 images, ipc
images per class, MTT's ConvNet at the preset's width, depth 3, instance norm, DSA on every
inner step, matching loss against a random nearby target. One outer iteration =
`distill.matching.matching_grad` (the inner loop plus the gradient w.r.t. images and lr).

Every (mode, syn_steps) runs in a fresh subprocess, so peak memory is that setting's alone:
on CPU the peak RSS (resource.getrusage, allocator-independent; torch's allocations are
invisible to tracemalloc) and its increase over the RSS before the first iteration; on CUDA
torch.cuda.max_memory_allocated. Goal (issue 5): `constant` at 80 steps uses at most 1.3x its
memory at 10 steps.

Measured (preset cpu: ConvNet w16, 10 images, one thread, shared 2-core box, timings noisy):
    peak RSS over the pre-run base, syn_steps 10 / 20 / 40 / 80:
      unrolled  84 / 136 / 211 / 380 MB   (4.5x from 10 to 80 steps)
      constant  70 /  70 /  70 /  73 MB   (1.04x; whole-process peak 640 -> 642 MB, 1.004x)
    s/iteration at 80 steps: unrolled 1.41, constant 2.65 (1.9x: one extra forward/backward per step)

    .venv/bin/python benchmarks/matching_speed.py --preset cpu     # ~3 min on 2 cores
    .venv/bin/python benchmarks/matching_speed.py --preset tiny    # seconds
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "tiny": {"steps": [2, 4], "width": 8, "ipc": 1, "repeats": 1, "threads": 1},
    "cpu": {"steps": [10, 20, 40, 80], "width": 16, "ipc": 1, "repeats": 2, "threads": 1},
    "gpu": {"steps": [10, 20, 40, 80], "width": 128, "ipc": 10, "repeats": 3, "threads": 4},  # MTT CIFAR-10 net
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_setting(mode: str, steps: int, width: int, ipc: int, repeats: int, device: str) -> dict:
    """Runs in its own process: time `repeats` iterations after one warm-up, report peak memory."""
    import torch

    from distill.augment import DSAConfig, sample_params
    from distill.matching import Segment, Student, matching_grad
    from distill.nets import create_net, flatten_params, param_layout
    from distill.trajectory import layout_to_json

    torch.manual_seed(0)
    dev = torch.device(device)
    kwargs = {"width": width, "depth": 3}
    net = create_net("convnet", num_classes=10, **kwargs)
    meta = {"layout": layout_to_json(param_layout(net)), "net": "convnet", "net_kwargs": kwargs,
            "num_classes": 10, "channels": 3, "image_size": 32}
    student = Student(meta, dev)
    start = flatten_params(net).to(dev)
    target = start + 0.01 * torch.randn_like(start)
    n = 10 * ipc
    images = torch.randn(n, 3, 32, 32, device=dev)
    labels = torch.arange(10, device=dev).repeat_interleave(ipc)
    gen = torch.Generator().manual_seed(0)
    plan = [(torch.arange(n, device=dev), sample_params(n, DSAConfig(), gen).to(dev)) for _ in range(steps)]
    seg = Segment(start, [(steps, target, 1.0)], plan)
    lr = torch.tensor(0.01, device=dev)
    base_rss = _current_rss_mb()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev) / 2**20
    matching_grad(mode, student, images, labels, lr, seg)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matching_grad(mode, student, images, labels, lr, seg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = {"mode": mode, "syn_steps": steps, "s_per_iter": round(min(times), 4), "device": device}
    if dev.type == "cuda":
        row["peak_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        row["peak_over_base_mb"] = round(row["peak_mb"] - base_cuda, 1)
    else:
        row["peak_mb"] = round(_rss_mb(), 1)
        row["peak_over_base_mb"] = round(_rss_mb() - base_rss, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "mode,steps" in a subprocess
    args = parser.parse_args()
    p = PRESETS[args.preset]
    if args.one:
        import torch

        torch.set_num_threads(p["threads"])
        mode, steps = args.one.split(",")
        print(json.dumps(one_setting(mode, int(steps), p["width"], p["ipc"], p["repeats"], args.device)))
        return
    rows = []
    for mode in ("unrolled", "constant"):
        for steps in p["steps"]:
            out = subprocess.run(
                [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--one", f"{mode},{steps}"],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:9s} syn_steps={steps:3d}  {row['s_per_iter']:.3f} s/iter  peak {row['peak_mb']:.0f} MB "
                  f"(+{row['peak_over_base_mb']:.0f} MB over the pre-run base)", flush=True)
    by = {(r["mode"], r["syn_steps"]): r for r in rows}
    lo, hi = min(p["steps"]), max(p["steps"])
    ratio = lambda mode, key: by[(mode, hi)][key] / max(by[(mode, lo)][key], 1e-9)  # noqa: E731
    summary = {
        "benchmark": "matching_speed", "preset": args.preset, "device": args.device,
        "setting": {"images": f"10x{p['ipc']} 3x32x32", "net": f"convnet w{p['width']} d3 instance", "dsa": True},
        "rows": rows,
        f"constant_peak_ratio_{hi}_vs_{lo}": round(ratio("constant", "peak_mb"), 3),
        f"constant_growth_ratio_{hi}_vs_{lo}": round(ratio("constant", "peak_over_base_mb"), 3),
        f"unrolled_growth_ratio_{hi}_vs_{lo}": round(ratio("unrolled", "peak_over_base_mb"), 3),
        f"time_ratio_constant_vs_unrolled_at_{hi}": round(by[("constant", hi)]["s_per_iter"] / by[("unrolled", hi)]["s_per_iter"], 3),
        "goal_constant_peak_at_most_1.3x": ratio("constant", "peak_mb") <= 1.3,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

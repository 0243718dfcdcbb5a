"""Trajectory-matching speed and memory: instance-norm implementations, memory modes, thread count.

One outer iteration = `distill.matching.matching_grad` (the inner loop plus the gradient w.r.t.
images and lr) on a fixed random problem: 10 classes of 3x32x32 images, ipc per class, MTT's
ConvNet (depth 3, instance norm), DSA on every inner step, matching loss against a nearby
random target. Parts (--part, default all):

  norm     unrolled mode, the student's layers: native (GroupNorm(C, C), avg_pool2d), fused_norm
           (distill/fused_norm.py's closed-form double backward) and fast (fused norm + strided-add
           pooling, distill/fast_pool.py: what matching uses by default); goal: fast <= 0.8x native.
  modes    unrolled / constant / budget at syn_steps 10, 30, 80 (width 32, fast layers); the budget is
           budget_fraction x the unrolled graph (so budget keeps that share of the steps' graphs);
           goals: budget <= 1.2x unrolled, memory strictly between constant and unrolled,
           constant memory at 80 steps <= 1.3x at 10.
  threads  the same unrolled iteration at 1 and 2 torch threads (speedup = t1 / t2).
  allocator  glibc's default malloc vs freed blocks kept for reuse (distill.allocator; width 128).
  profile  shares of one iteration's CPU time by op category (convolution, norm, pooling,
           activation, other) for native and fast layers at the norm settings: what is left to
           gain outside the convolutions.
Runs keep freed memory (as the library's heavy loops do) unless --default-malloc.

Timing: every variant of a setting runs in the same process, one iteration each in turn (order
reversed every other round) after a warm-up round; ratios are medians of per-round ratios, so
machine load (recorded as /proc/loadavg) shifts both sides alike. Memory: graph memory, i.e.
the peak bytes of tensors autograd saved and kept alive at once (distill.graph_memory), from
one extra metered iteration per variant; it is what the modes trade against time and does not
depend on the load or the allocator. The whole process's peak RSS is reported too.

    .venv/bin/python benchmarks/matching_speed.py --preset tiny                 # seconds
    .venv/bin/python benchmarks/matching_speed.py --preset cpu --part norm      # ~4 min on 2 loaded cores
    .venv/bin/python benchmarks/matching_speed.py --preset cpu --part modes
    .venv/bin/python benchmarks/matching_speed.py --preset cpu --part threads
    .venv/bin/python benchmarks/matching_speed.py --preset cpu --part allocator
    .venv/bin/python benchmarks/matching_speed.py --preset cpu --part profile
Last line: one JSON object; every run is appended to benchmarks/records/matching_speed.jsonl.
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

# norm: (width, ipc, syn_steps) settings; modes: width, ipc, steps; threads: (width, ipc, steps)
PRESETS = {
    "tiny": {
        "norm": [(8, 1, 2)],
        "norm_rounds": 1,
        "modes": {"width": 8, "ipc": 1, "steps": [2, 4]},
        "mode_rounds": 1,
        "threads_setting": (8, 1, 2),
        "thread_rounds": 1,
        "threads": 1,
        "allocator_setting": (8, 1, 2),
    },
    "cpu": {
        "norm": [(32, 10, 10), (32, 10, 30), (128, 10, 2)],
        "norm_rounds": 2,
        "modes": {"width": 32, "ipc": 1, "steps": [10, 30, 80]},
        "mode_rounds": 2,
        "threads_setting": (32, 10, 10),
        "thread_rounds": 3,
        "threads": 1,
        "allocator_setting": (128, 10, 2),
    },
    "gpu": {
        "norm": [(128, 10, 20), (128, 10, 40)],
        "norm_rounds": 5,
        "modes": {"width": 128, "ipc": 10, "steps": [10, 30, 80]},
        "mode_rounds": 3,
        "threads_setting": (128, 10, 10),
        "thread_rounds": 3,
        "threads": 4,
        "allocator_setting": (128, 10, 10),
    },
}
BUDGET_FRACTION = 0.5


# Student layers compared in part norm: the experts' own (GroupNorm, avg_pool2d), the fused norm
# alone, and the fast student matching uses by default (fused norm + strided-add pooling).
LAYERS = {"native": ("instance", False), "fused_norm": ("instance_fused", False), "fast": ("instance", True)}


def problem(width: int, ipc: int, steps: int, layers: str, device: str):
    """(student, images, labels, lr, segment) of one matching iteration; same values for every LAYERS entry."""
    import torch

    from distill.augment import DSAConfig, sample_params
    from distill.matching import Segment, Student
    from distill.nets import create_net, flatten_params
    from distill.trajectory import net_meta

    torch.manual_seed(0)
    dev = torch.device(device)
    norm, fast = LAYERS[layers]
    kwargs = {"width": width, "depth": 3, "norm": norm}
    net = create_net("convnet", num_classes=10, **kwargs)
    student = Student(net_meta(net, "convnet", kwargs, num_classes=10), dev, fast=fast)
    start = flatten_params(net).to(dev)
    target = start + 0.01 * torch.randn_like(start)
    n = 10 * ipc
    images = torch.randn(n, 3, 32, 32, device=dev)
    labels = torch.arange(10, device=dev).repeat_interleave(ipc)
    gen = torch.Generator().manual_seed(0)
    plan = [(torch.arange(n, device=dev), sample_params(n, DSAConfig(), gen).to(dev)) for _ in range(steps)]
    return student, images, labels, torch.tensor(0.01, device=dev), Segment(start, [(steps, target, 1.0)], plan)


def graph_mb(fn) -> float:
    from distill.graph_memory import GraphMemoryMeter

    with GraphMemoryMeter() as meter:
        fn()
    return round(meter.peak_mb, 2)


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else None


def part_norm(p: dict, device: str) -> dict:
    from distill.matching import matching_grad

    rows = []
    for width, ipc, steps in p["norm"]:
        calls = {}
        for layers in LAYERS:
            args = problem(width, ipc, steps, layers, device)
            calls[layers] = lambda args=args: matching_grad("unrolled", *args)
        times = interleaved(calls, p["norm_rounds"], sync=_sync(device))
        row = {
            "width": width,
            "ipc": ipc,
            "syn_steps": steps,
            "fused_norm_vs_native_time": paired_ratio(times, "fused_norm", "native"),
            "fast_vs_native_time": paired_ratio(times, "fast", "native"),
        }
        for layers, fn in calls.items():
            row[layers] = {**timing_summary(times[layers]), "graph_peak_mb": graph_mb(fn)}
        row["fast_vs_native_graph_mb"] = round(row["fast"]["graph_peak_mb"] / row["native"]["graph_peak_mb"], 3)
        rows.append(row)
        print(
            f"norm  w{width} ipc{ipc} steps {steps:3d}: "
            + ", ".join(f"{k} {row[k]['s_median']:.3f} s {row[k]['graph_peak_mb']:.0f} MB" for k in LAYERS)
            + f"; fused_norm/native {row['fused_norm_vs_native_time']}, fast/native {row['fast_vs_native_time']}",
            flush=True,
        )
    worst = max(r["fast_vs_native_time"] for r in rows)
    return {
        "norm_rows": rows,
        "fused_norm_vs_native_time_worst": max(r["fused_norm_vs_native_time"] for r in rows),
        "fast_vs_native_time_worst": worst,
        "goal_fast_at_most_0.8x": worst <= 0.8,
    }


def part_modes(p: dict, device: str) -> dict:
    from distill.matching import matching_grad, step_graph_mb

    m, rows = p["modes"], []
    for steps in m["steps"]:
        args = problem(m["width"], m["ipc"], steps, "fast", device)
        budget = BUDGET_FRACTION * steps * step_graph_mb(*args)
        calls = {
            mode: (
                lambda mode=mode, args=args, budget=budget: matching_grad(
                    mode, *args, memory_budget_mb=budget if mode == "budget" else None
                )
            )
            for mode in ("unrolled", "constant", "budget")
        }
        times = interleaved(calls, p["mode_rounds"], sync=_sync(device))
        row = {
            "syn_steps": steps,
            "budget_mb": round(budget, 2),
            "budget_vs_unrolled_time": paired_ratio(times, "budget", "unrolled"),
            "constant_vs_unrolled_time": paired_ratio(times, "constant", "unrolled"),
        }
        for mode, fn in calls.items():
            row[mode] = {**timing_summary(times[mode]), "graph_peak_mb": graph_mb(fn)}
        rows.append(row)
        print(
            f"modes steps {steps:3d}: "
            + ", ".join(f"{mode} {row[mode]['s_median']:.3f} s {row[mode]['graph_peak_mb']:.0f} MB" for mode in calls)
            + f"; budget/unrolled {row['budget_vs_unrolled_time']}",
            flush=True,
        )
    lo, hi = rows[0], rows[-1]
    return {
        "mode_setting": {**m, "layers": "fast", "budget_fraction": BUDGET_FRACTION},
        "mode_rows": rows,
        f"constant_graph_ratio_{hi['syn_steps']}_vs_{lo['syn_steps']}": round(
            hi["constant"]["graph_peak_mb"] / lo["constant"]["graph_peak_mb"], 3
        ),
        "goal_budget_at_most_1.2x_unrolled": all(r["budget_vs_unrolled_time"] <= 1.2 for r in rows),
        "goal_budget_memory_between": all(
            r["constant"]["graph_peak_mb"] < r["budget"]["graph_peak_mb"] < r["unrolled"]["graph_peak_mb"] for r in rows
        ),
        "goal_constant_memory_at_most_1.3x": hi["constant"]["graph_peak_mb"] <= 1.3 * lo["constant"]["graph_peak_mb"],
    }


def part_threads(p: dict, device: str) -> dict:
    import torch

    from distill.matching import matching_grad

    width, ipc, steps = p["threads_setting"]
    args = problem(width, ipc, steps, "fast", device)

    def at(threads: int):
        def call():
            torch.set_num_threads(threads)
            matching_grad("unrolled", *args)

        return call

    times = interleaved({"1": at(1), "2": at(2)}, p["thread_rounds"], sync=_sync(device))
    torch.set_num_threads(p["threads"])
    speedup = round(1 / paired_ratio(times, "2", "1"), 3)
    print(
        f"threads w{width} ipc{ipc} steps {steps}: 1 thread {timing_summary(times['1'])['s_median']:.3f} s, "
        f"2 threads {timing_summary(times['2'])['s_median']:.3f} s, speedup {speedup}",
        flush=True,
    )
    return {
        "threads_setting": {"width": width, "ipc": ipc, "syn_steps": steps, "layers": "fast"},
        "threads_1": timing_summary(times["1"]),
        "threads_2": timing_summary(times["2"]),
        "speedup_2_vs_1_thread": speedup,
    }


def part_allocator(p: dict, device: str) -> dict:
    """glibc's default malloc vs freed blocks kept (distill.allocator), toggled in one process."""
    import time

    from distill.allocator import keep_freed_memory, restore_default_malloc
    from distill.matching import matching_grad

    width, ipc, steps = p["allocator_setting"]
    args = problem(width, ipc, steps, "fast", device)
    times: dict[str, list[float]] = {"default": [], "kept": []}
    for _ in range(p["thread_rounds"]):
        restore_default_malloc()
        t0 = time.perf_counter()
        matching_grad("unrolled", *args)
        times["default"].append(time.perf_counter() - t0)
        keep_freed_memory()
        matching_grad("unrolled", *args)  # fills the heap the timed run reuses, as every later iteration does
        t0 = time.perf_counter()
        matching_grad("unrolled", *args)
        times["kept"].append(time.perf_counter() - t0)
    keep_freed_memory()
    ratio = paired_ratio(times, "kept", "default")
    print(
        f"allocator w{width} ipc{ipc} steps {steps}: default {timing_summary(times['default'])['s_median']:.3f} s, "
        f"kept {timing_summary(times['kept'])['s_median']:.3f} s (ratio {ratio})",
        flush=True,
    )
    return {
        "allocator_setting": {"width": width, "ipc": ipc, "syn_steps": steps, "layers": "fast"},
        "malloc_default": timing_summary(times["default"]),
        "malloc_kept": timing_summary(times["kept"]),
        "kept_vs_default_malloc_time": ratio,
    }


# Self time of each profiled op, by the first category whose pattern its name contains.
OP_CATEGORIES = {
    "convolution": ("conv",),
    "norm": ("group_norm", "instance_norm", "batch_norm"),
    "pooling": ("pool",),
    "activation": ("threshold", "relu", "clamp_min"),
}


def op_seconds(events) -> dict[str, float]:
    """Self CPU seconds per OP_CATEGORIES entry (the rest is "other")."""
    totals = dict.fromkeys([*OP_CATEGORIES, "other"], 0.0)
    for event in events:
        name = event.key.lower()
        category = next((c for c, keys in OP_CATEGORIES.items() if any(k in name for k in keys)), "other")
        totals[category] += event.self_cpu_time_total / 1e6
    return totals


def part_profile(p: dict, device: str) -> dict:
    """Where one unrolled iteration's time goes, per layer set: the convolutions' seconds bound
    what faster non-convolution layers can save (torch.profiler; a profiled warm-up iteration of
    each is discarded, since the process's first profiled iteration carries the profiler's start-up,
    then `norm_rounds` rounds in turn, summed)."""
    from torch.profiler import ProfilerActivity, profile

    from distill.matching import matching_grad

    rows = []
    for width, ipc, steps in p["norm"]:
        problems = {layers: problem(width, ipc, steps, layers, device) for layers in ("native", "fast")}
        seconds = {layers: dict.fromkeys([*OP_CATEGORIES, "other"], 0.0) for layers in problems}
        for round_ in range(p["norm_rounds"] + 1):
            for layers, args in problems.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    matching_grad("unrolled", *args)
                if round_:
                    for category, t in op_seconds(prof.key_averages()).items():
                        seconds[layers][category] += t
        row: dict = {"width": width, "ipc": ipc, "syn_steps": steps}
        for layers, by in seconds.items():
            whole = sum(by.values())
            row[layers] = {
                "shares": {c: round(t / whole, 3) for c, t in by.items()},
                "s_per_iteration": round(whole / p["norm_rounds"], 3),
                "convolution_s": round(by["convolution"] / p["norm_rounds"], 3),
            }
        rows.append(row)
        print(
            f"profile w{width} ipc{ipc} steps {steps}: native {row['native']}, fast {row['fast']}",
            flush=True,
        )
    return {
        "profile_rows": rows,
        "profile_note": (
            "self CPU time under torch.profiler, which inflates the native layers' many small ops more "
            "(compare times with part norm); convolution = every aten conv op; the native layers' norm "
            "double backward is composite elementwise ops, counted in other"
        ),
    }


PARTS = {
    "norm": part_norm,
    "modes": part_modes,
    "threads": part_threads,
    "allocator": part_allocator,
    "profile": part_profile,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--part", default="all", choices=["all", *PARTS])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records (smoke tests)")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc (runs call distill.allocator.keep_freed_memory otherwise)",
    )
    args = parser.parse_args()
    import torch

    from distill.allocator import keep_freed_memory
    from distill.utils import peak_rss_mb

    p = PRESETS[args.preset]
    torch.set_num_threads(p["threads"])
    load_start = loadavg()
    print(f"preset {args.preset}, torch threads {torch.get_num_threads()}, loadavg {load_start}", flush=True)
    malloc = "default" if args.default_malloc or not keep_freed_memory() else "kept"
    summary = {
        "benchmark": "matching_speed",
        "part": args.part,
        "device": args.device,
        "malloc": malloc,
        "setting": "10 classes x ipc 3x32x32, convnet depth 3, DSA, one matching iteration",
    }
    for name, fn in PARTS.items():
        if args.part in ("all", name):
            summary.update(fn(p, args.device))
    summary["process_peak_rss_mb"] = peak_rss_mb()
    summary["threads_used"] = p["threads"]
    if not args.no_record:
        append_flat_record(
            "matching_speed", summary, preset=args.preset, threads=p["threads"], loadavg_start=load_start
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Speedup from 1 to 2 torch threads for the three loops a task runs (issue 15 part 3).

A Ray task sets torch's threads to the CPUs Ray granted it (tasks.runtime.task_device); this
measures what a second granted core buys for:

  matching    one unrolled trajectory-matching iteration (ConvNet, fast layers, DSA),
  expert      expert-training steps (ConvNet, batch 256, DSA, SGD), as distill.experts runs them,
  evaluation  training a fresh net on a distilled-size set (distill.train, DSA), as evaluation does.

Each workload runs at 1 and 2 threads in turn in one process (the order reversed every other
round, benchmarks.speed_common.interleaved); speedup = median over rounds of t(1) / t(2).
Meaningful only on an otherwise idle machine: /proc/loadavg is recorded at start and end.

    .venv/bin/python benchmarks/threads.py --preset cpu     # about 3 minutes on 2 idle cores
    .venv/bin/python benchmarks/threads.py --preset tiny    # seconds
Last line: one JSON object; every run is appended to benchmarks/records/threads.jsonl.
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
    # matching: (width, ipc, syn_steps); expert: (width, steps); evaluation: (width, images, epochs)
    "tiny": {"matching": (8, 1, 2), "expert": (8, 2), "evaluation": (8, 10, 2), "rounds": 1},
    "cpu": {"matching": (32, 10, 10), "expert": (32, 8), "evaluation": (32, 100, 20), "rounds": 3},
}


def _matching(width: int, ipc: int, steps: int):
    from benchmarks.matching_speed import problem
    from distill.matching import matching_grad

    args = problem(width, ipc, steps, "fast", "cpu")
    return lambda: matching_grad("unrolled", *args)


def _expert(width: int, steps: int):
    import torch

    from distill.augment import AUGMENTS
    from distill.nets import create_net

    torch.manual_seed(0)
    net = create_net("convnet", num_classes=10, width=width, depth=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(256 * steps, 3, 32, 32), torch.randint(0, 10, (256 * steps,))
    augment, gen = AUGMENTS["dsa"], torch.Generator().manual_seed(0)

    def run():
        for s in range(steps):
            b = slice(256 * s, 256 * (s + 1))
            loss = torch.nn.functional.cross_entropy(net(augment(x[b], gen)), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def _evaluation(width: int, images: int, epochs: int):
    import torch

    from distill.nets import create_net
    from distill.train import TrainConfig, train

    x, y = torch.randn(images, 3, 32, 32), torch.arange(images) % 10
    cfg = TrainConfig(epochs=epochs, batch_size=256, lr=0.01, momentum=0.9, weight_decay=5e-4, augment="dsa")

    def run():
        torch.manual_seed(0)
        train(create_net("convnet", num_classes=10, width=width, depth=3, norm="instance"), x, y, cfg, device="cpu")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records")
    args = parser.parse_args()
    import torch

    p, load_start = PRESETS[args.preset], loadavg()
    workloads = {
        "matching": _matching(*p["matching"]),
        "expert": _expert(*p["expert"]),
        "evaluation": _evaluation(*p["evaluation"]),
    }
    out = {"benchmark": "threads", "preset": args.preset, "settings": {k: p[k] for k in workloads}}
    for name, work in workloads.items():

        def at(threads: int, work=work):
            def call():
                torch.set_num_threads(threads)
                work()

            return call

        times = interleaved({"1": at(1), "2": at(2)}, p["rounds"])
        speedup = round(1 / paired_ratio(times, "2", "1"), 3)
        out[name] = {
            "threads_1": timing_summary(times["1"]),
            "threads_2": timing_summary(times["2"]),
            "speedup": speedup,
        }
        print(
            f"{name}: 1 thread {out[name]['threads_1']['s_median']:.3f} s, "
            f"2 threads {out[name]['threads_2']['s_median']:.3f} s, speedup {speedup}",
            flush=True,
        )
    torch.set_num_threads(1)
    out["loadavg_start"], out["loadavg_end"] = load_start, loadavg()
    # a second core is worth having where it buys at least 1.3x (the machine's other work aside)
    for name in workloads:
        out[f"goal_{name}_2_threads_at_least_1.3x"] = out[name]["speedup"] >= 1.3
    if not args.no_record:
        append_flat_record("threads", out, preset=args.preset, threads=2, loadavg_start=load_start)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Shared by the speed benchmarks (matching_speed, evaluate_speed): interleaved timing and records.

On a shared, loaded machine absolute times drift by 2x within minutes, so variants are compared
inside one process, one iteration of each in turn (the order reversed every other round), and
ratios are taken per round before the median. Every run appends its summary, the git revision,
preset, thread count and /proc/loadavg (start and end) to benchmarks/records/<name>.jsonl.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())


def git_revision() -> str:
    """Short HEAD, with '+dirty' when distill/ or benchmarks/ differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "distill", "benchmarks")
        return (git("rev-parse", "--short", "HEAD") or "n/a") + ("+dirty" if dirty else "")
    except OSError:
        return "n/a"


def interleaved(
    variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds of each call, variants in turn (reversed order every other round), after `warmup` rounds."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            variants[name]()
            if sync is not None:
                sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of time[num] / time[den] (each round's two runs are close in time)."""
    return round(statistics.median(a / b for a, b in zip(times[num], times[den])), 3)


def timing_summary(seconds: list[float]) -> dict[str, float]:
    return {"s_median": round(statistics.median(seconds), 4), "s_min": round(min(seconds), 4), "runs": len(seconds)}


def append_record(name: str, summary: dict[str, Any], *, preset: str, threads: int, loadavg_start: str) -> Path:
    """Append summary + provenance as one JSON line to benchmarks/records/<name>.jsonl."""
    import torch

    record = {
        **summary,
        "git": git_revision(),
        "preset": preset,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{name}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return path

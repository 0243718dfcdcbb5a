"""Shared by the speed benchmarks (matching_speed, evaluate_speed, threads): interleaved timing.

On a shared, loaded machine absolute times drift by 2x within minutes, so variants are compared
inside one process, one iteration of each in turn (the order reversed every other round), and
ratios are taken per round before the median. Records: benchmarks/records.py (append_flat_record).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


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

"""Benchmark records: every run appends its result to benchmarks/records/<name>.jsonl (committed).

One line per run: the benchmark's JSON, the git revision (and whether the tree had uncommitted
changes), the preset, torch's thread count, the CPU count and /proc/loadavg at start and end.
Wall times on a shared machine are upper bounds; the load average says how busy it was, and
process CPU seconds (where a benchmark reports them) are closer to an idle run.

Two line shapes, one per file so a file's lines stay comparable: `append_record` nests the
result under "result" beside the provenance (the transfer and pipeline benchmarks);
`append_flat_record` puts the summary's keys at the top level with the provenance beside them
(the speed benchmarks, tm_quality, gpu_check). Both come from here, with the same git, load
and time fields. Standard library only at import time: gpu_check runs where the project's
other dependencies are missing.

    from benchmarks.records import append_record, append_flat_record, loadavg
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "benchmarks" / "records"


def loadavg() -> str:
    """/proc/loadavg as written (1, 5 and 15-minute loads, runnable/total tasks, last pid)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        try:
            return " ".join(f"{v:.2f}" for v in os.getloadavg())
        except OSError:
            return ""


def git_revision() -> str:
    """HEAD's short hash, with '+dirty' when tracked files differ from it ('unknown' outside git)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:  # no git on this machine
            return ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _append(name: str, record: dict[str, Any]) -> Path:
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{name}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return path


def append_flat_record(
    name: str, summary: dict[str, Any], *, preset: str, threads: int, loadavg_start: str, **extra: Any
) -> Path:
    """Append the summary's keys plus provenance (git, preset, threads, CPUs, torch, load, time) as one line."""
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
        "time": _now(),
        **extra,
    }
    return _append(name, record)


def append_record(
    name: str, result: dict[str, Any], *, preset: str, loadavg_start: str, overrides: list[str] | None = None
) -> Path:
    """Append one run to benchmarks/records/<name>.jsonl and return the file."""
    import torch

    record = {
        "time": _now(),
        "git": git_revision(),
        "preset": preset,
        "overrides": overrides or [],
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "result": result,
    }
    return _append(name, record)

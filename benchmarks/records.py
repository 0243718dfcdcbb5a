"""Benchmark records: every run appends its result to benchmarks/records/<name>.jsonl (committed).

One line per run: the benchmark's JSON, the git revision (and whether the tree had uncommitted
changes), the preset and overrides, torch's thread count, the CPU count and /proc/loadavg at
start and end. Wall times on a shared machine are upper bounds; the load average says how busy
it was, and process CPU seconds (where a benchmark reports them) are closer to an idle run.

    from benchmarks.records import append_record, loadavg
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
    """The first three fields of /proc/loadavg ('' where there is none)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def git_revision() -> str:
    """HEAD's short hash, with '+dirty' when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def append_record(
    name: str, result: dict[str, Any], *, preset: str, loadavg_start: str, overrides: list[str] | None = None
) -> Path:
    """Append one run to benchmarks/records/<name>.jsonl and return the file."""
    import torch

    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "preset": preset,
        "overrides": overrides or [],
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "result": result,
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{name}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return path

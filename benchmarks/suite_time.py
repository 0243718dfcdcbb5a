"""Wall time of the README's test command (`make test`: ruff, then the fast pytest suite) on this machine.

Issue 16 asks the README to state how long `make test` takes on 2 cores; this runs it once,
parses pytest's summary line and records wall time, counts and the machine load (the number
means something only on an otherwise idle machine; /proc/loadavg is recorded at start and end).

    .venv/bin/python benchmarks/suite_time.py          # one full `make test` (about 8 minutes on 2 idle cores)
Last line: one JSON object; every run is appended to benchmarks/records/suite_time.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.records import append_record, loadavg  # noqa: E402

GOAL_S = 15 * 60  # the fast suite stays well under 15 minutes on 2 idle cores


def summary_counts(text: str) -> dict[str, int]:
    """pytest's final counts ('670 passed, 7 skipped, 1 failed in ...') as a dict."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not lines:
        return {}
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records")
    args = parser.parse_args()
    load_start = loadavg()
    start = time.perf_counter()
    proc = subprocess.run(["make", "test"], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    counts = summary_counts(proc.stdout + proc.stderr)
    out = {
        "benchmark": "suite_time",
        "command": "make test",
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "counts": counts,
        # pytest's short summary (-ra) names each failure: what to look at when goal_passed is false
        "failed_tests": re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout + proc.stderr, re.M),
        "goal_passed": proc.returncode == 0 and counts.get("failed", 0) == 0,
        "goal_under_15_min": wall < GOAL_S,
    }
    if not args.no_record:
        append_record("suite_time", out, preset="fast", loadavg_start=load_start)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

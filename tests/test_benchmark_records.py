"""benchmarks/records.py: the one writer of benchmarks/records/*.jsonl, in both line shapes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import records  # noqa: E402


def test_both_shapes_carry_the_same_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RECORDS", tmp_path)
    start = records.loadavg()
    nested = records.append_record("nested", {"goal_x": True}, preset="cpu", loadavg_start=start, overrides=["a=1"])
    flat = records.append_flat_record(
        "flat", {"goal_y": False}, preset="tiny", threads=2, loadavg_start=start, rows=[1]
    )
    records.append_flat_record("flat", {"goal_y": True}, preset="tiny", threads=2, loadavg_start=start)
    (n,) = [json.loads(line) for line in nested.read_text().splitlines()]
    f1, f2 = [json.loads(line) for line in flat.read_text().splitlines()]  # appended, not overwritten
    assert n["result"] == {"goal_x": True} and n["overrides"] == ["a=1"] and n["preset"] == "cpu"
    assert f1["goal_y"] is False and f2["goal_y"] is True and f1["rows"] == [1] and f1["threads"] == 2
    for rec in (n, f1):
        assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?", rec["git"]), rec["git"]
        assert rec["loadavg_start"] == start and len(rec["loadavg_end"].split()) >= 3
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rec["time"])

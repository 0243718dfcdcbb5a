"""Plain-text tables for logs, the CLI and markdown artifacts (no heavy imports, so CLIs stay quick)."""

from __future__ import annotations

import math
from typing import Any


def fmt(v: Any) -> str:
    """Four significant digits for floats; everything else as str."""
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured markdown table; columns from the first row."""
    if not rows:
        return "_no rows_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"

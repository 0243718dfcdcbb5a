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


# ---------------------------------------------------------------- the per-path report a person reads

_ACCURACIES = (("linear_probe_acc", "linear probe"), ("fine_tune_acc", "fine-tune"), ("test_acc", "test accuracy"))


def pct(mean: float | None, std: float | None = None) -> str:
    """An accuracy fraction as a percentage with one decimal, with its spread: '43.2 +- 0.7'."""
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "-"
    return f"{100 * mean:.1f}" + (f" +- {100 * std:.1f}" if std is not None and math.isfinite(std) else "")


def _diff(a: dict[str, Any], b: dict[str, Any], metric: str) -> tuple[float, float] | None:
    # difference of the means and the two stds combined as for independent runs
    m, base = a.get(f"{metric}_mean"), b.get(f"{metric}_mean")
    if m is None or base is None:
        return None
    return m - base, math.hypot(a.get(f"{metric}_std") or 0.0, b.get(f"{metric}_std") or 0.0)


def pct_diff(a: dict[str, Any], b: dict[str, Any], metric: str) -> str:
    """a's mean minus b's in points, with the spread of the difference: '+4.1 +- 1.2'."""
    d = _diff(a, b, metric)
    return "-" if d is None else f"{100 * d[0]:+.1f} +- {100 * d[1]:.1f}"


def verdict(method: dict[str, Any], baseline: dict[str, Any], metric: str) -> str | None:
    """'+4.1 +- 1.2 points over <baseline>: gain' (difference of the means, spread = the two stds combined
    as for independent runs); 'no clear gain' when the difference is within that spread."""
    d = _diff(method, baseline, metric)
    if d is None:
        return None
    diff, spread = d
    word = "gain" if diff > spread else "loss" if diff < -spread else "no clear gain (within the spread)"
    return f"{pct_diff(method, baseline, metric)} points over {baseline['method']}: {word}"


def path_report(rows: list[dict[str, Any]]) -> str:
    """Markdown: one table per path (only the columns that path fills, accuracies as percentages with
    one decimal and +- std), then one verdict line per method against each of its baselines."""
    out = []
    for path in dict.fromkeys(r["path"] for r in rows):
        group = [r for r in rows if r["path"] == path]
        metrics = [(k, label) for k, label in _ACCURACIES if any(r.get(f"{k}_mean") is not None for r in group)]
        table = []
        for r in group:
            row = {"method": r["method"], "role": r.get("kind", "")}
            row |= {label: pct(r.get(f"{k}_mean"), r.get(f"{k}_std")) for k, label in metrics}
            row["seeds"] = r.get("seeds", "")
            if r.get("data_mib") is not None:
                row["data (MiB)"] = f"{r['data_mib']:.2f}"
            for key, label in (("wall_s", "stage time (s)"), ("peak_rss_mb", "peak (MiB)")):
                if any(g.get(key) is not None for g in group):
                    row[label] = "-" if r.get(key) is None else f"{r[key]:.0f}"
            table.append(row)
        out.append(f"### {path}\n\n" + markdown_table(table))
        methods = [r for r in group if r.get("kind") == "method"]
        baselines = [r for r in group if r.get("kind") == "baseline"]
        lines = []
        for m in methods:
            for k, label in metrics:
                said = [v for b in baselines if (v := verdict(m, b, k))]
                if said:
                    lines.append(f"- {m['method']}, {label}: " + "; ".join(said))
        if lines:
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)

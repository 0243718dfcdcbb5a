"""Prefect UI reports: progress artifacts fed by the core's progress callbacks, tables, images.

The core (`distill/`, `dp4tl/`) reports progress through a plain callback
`progress(step, total, **metrics)`; `prefect_progress` turns that into a Prefect progress
artifact plus throttled log lines, so a long loop is visible in the UI without flooding
the API.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import MissingContextError

from tasks.tables import fmt


def ui_key(*parts: Any) -> str:
    """A Prefect UI artifact key (lowercase letters, digits, dashes) from free-form parts.

    Not the store's content hash (`tasks.store.artifact_key`): UI artifacts with the same key
    form a history in the Prefect UI, so keys name what is reported (e.g.
    `baseline-cifar10-ipc10`), not the run.
    """
    key = "-".join(str(p) for p in parts if p not in (None, ""))
    key = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")
    return re.sub(r"-{2,}", "-", key)[:100] or "distillery"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, a plain logger when called directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("distillery")


def prefect_progress(title: str, *, key: str | None = None, min_interval_s: float = 2.0) -> Callable[..., None]:
    """A `progress(step, total, **metrics)` callback that updates a Prefect progress artifact."""
    logger = run_logger()
    artifact_id = create_progress_artifact(progress=0.0, key=key, description=title)
    last = [0.0]

    def progress(step: int, total: int, **metrics: Any) -> None:
        now = time.monotonic()
        done = step >= total
        if not done and now - last[0] < min_interval_s:
            return
        last[0] = now
        pct = 100.0 * step / max(total, 1)
        shown = ", ".join(f"{k}={fmt(v)}" for k, v in metrics.items())
        update_progress_artifact(artifact_id, progress=pct, description=f"{title}: {shown}")
        logger.info("%s %d/%d %s", title, step, total, shown)

    return progress


def progress(title: str, *parts: Any) -> Callable[..., None] | None:
    """A progress callback under the UI key ("progress", *parts) inside a flow or task run; None in a
    plain call (a test, a notebook), where the core simply runs without reporting."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    return prefect_progress(title, key=ui_key("progress", *parts))


def table(rows: list[dict[str, Any]], *, key: str, description: str) -> None:
    """A table artifact; floats are rounded so the UI stays readable."""
    shown = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    create_table_artifact(table=shown, key=key, description=description)


def markdown(text: str, *, key: str, description: str | None = None) -> None:
    create_markdown_artifact(markdown=text, key=key, description=description)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (tasks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_markdown(png: bytes, caption: str) -> str:
    """Markdown that embeds a PNG inline, so plots and image grids render in the Prefect UI."""
    data = base64.b64encode(png).decode("ascii")
    return f"![{caption}](data:image/png;base64,{data})\n"

"""Follow a flow run in the terminal: one line per stage, with percentage, ETA and its key metric.

    python -m flows.watch run pipeline/cpu            # start a deployment run and follow it
    python -m flows.watch run distill-tm/cpu --param resources='{"num_cpus": 2}'
    python -m flows.watch follow <flow-run-id>         # follow (or summarize) an existing run

`prefect deployment run --watch` prints Prefect's raw event stream (hundreds of lines, half
of them artifact updates with a UUID); this prints what a person wants to know: which stage
runs, how far it is, how long it has left, and what it reports (loss, accuracy). On a
terminal the running stages share one status line that is rewritten in place; otherwise
(CI, a log file) a line is printed whenever a stage starts, finishes or moves by 10%.
It reads the flow run's task runs and its progress artifacts (created by
`tasks.reports.prefect_progress`) from the Prefect API every `--interval` seconds and exits
with 0 when the run completes, 1 when it fails, crashes or is cancelled.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO
from uuid import UUID

FINAL_OK = {"COMPLETED"}
FINAL_BAD = {"FAILED", "CRASHED", "CANCELLED"}
LOG_LAG_S = 5.0  # how long Prefect may take to ship a task's log lines to the API


@dataclass
class StageLine:
    """What is known about one stage (a task run) of the watched flow run."""

    name: str
    state: str = "PENDING"
    cached: bool = False
    started: float | None = None
    finished: float | None = None
    progress: float | None = None  # percent, from the stage's progress artifact
    detail: str = ""  # the progress artifact's description: "<title>: loss=..., acc=..."
    history: list[tuple[float, float]] = field(default_factory=list)  # (time, percent)

    def eta_s(self, now: float) -> float | None:
        """Seconds left, from the progress rate over the stage's recent history."""
        if self.progress is None or len(self.history) < 2 or self.progress >= 100:
            return None
        (t0, p0), (t1, p1) = self.history[max(0, len(self.history) - 10)], self.history[-1]
        if p1 <= p0 or t1 <= t0:
            return None
        rate = (p1 - p0) / (t1 - t0)
        return (100.0 - p1) / rate + max(0.0, t1 - now)

    def text(self, now: float) -> str:
        if self.state in FINAL_OK or self.state in FINAL_BAD:
            end = now if self.finished is None else self.finished
            took = end - (end if self.started is None else self.started)
            verdict = "reused (cached)" if self.cached else f"{self.state.lower()} in {_duration(took)}"
            return f"{self.name}: {verdict}{_metric(self.detail)}"
        pct = f" {self.progress:5.1f}%" if self.progress is not None else ""
        eta = self.eta_s(now)
        eta_text = f", ETA {_duration(eta)}" if eta is not None else ""
        return f"{self.name}:{pct}{eta_text}{_metric(self.detail)}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _metric(detail: str) -> str:
    """The metrics part of a progress description, shortened for one line."""
    _, _, metrics = detail.partition(": ")
    metrics = metrics.strip()
    return f" ({metrics[:70]})" if metrics else ""


def _stage_name(task_run_name: str) -> str:
    # Prefect names task runs "<task>-<3 random chars>"; keep what tells stages apart.
    return re.sub(r"-[0-9a-f]{3}$", "", task_run_name)


class Watcher:
    """Polls the Prefect API for one flow run and renders its stages."""

    def __init__(self, client: Any, flow_run_id: UUID, out: TextIO, tty: bool | None = None):
        self.client, self.flow_run_id, self.out = client, flow_run_id, out
        self.tty = out.isatty() if tty is None else tty
        self.stages: dict[UUID, StageLine] = {}
        self.printed: dict[UUID, tuple[str, int]] = {}
        self.status_width = 0
        self.run_span: tuple[float | None, float | None] = (None, None)

    def poll(self) -> str:
        """Refresh every stage from the API; returns the flow run's state type."""
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterType,
            FlowRunFilter,
            FlowRunFilterId,
        )

        now = time.time()
        run = self.client.read_flow_run(self.flow_run_id)
        self.run_span = (
            run.start_time.timestamp() if run.start_time else None,
            run.end_time.timestamp() if run.end_time else None,
        )
        task_runs = self.client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[self.flow_run_id]))
        )
        for tr in task_runs:
            line = self.stages.setdefault(tr.id, StageLine(_stage_name(tr.name)))
            state = tr.state.type.value if tr.state else "PENDING"
            # Prefect's own cache hit; a @stage store hit is found among the progress artifacts below
            line.cached = line.cached or bool(tr.state and tr.state.name == "Cached")
            if state == "RUNNING" and line.started is None:
                line.started = tr.start_time.timestamp() if tr.start_time else now
            if state in FINAL_OK | FINAL_BAD and line.finished is None:
                line.finished = tr.end_time.timestamp() if tr.end_time else now
                if line.started is None:
                    line.started = tr.start_time.timestamp() if tr.start_time else line.finished
            line.state = state
        artifacts = self.client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[self.flow_run_id]), type=ArtifactFilterType(any_=["progress"])
            )
        )
        for art in artifacts:
            line = self.stages.get(art.task_run_id) if art.task_run_id else None
            if line is None or not isinstance(art.data, (int, float)):
                continue
            if (art.description or "").startswith("reused "):  # tasks.stage on a store hit
                line.cached = True
                continue
            if line.progress != float(art.data):
                line.history.append((now, float(art.data)))
            line.progress, line.detail = float(art.data), art.description or ""
        return run.state.type.value if run.state else "PENDING"

    def render(self, final: bool = False) -> None:
        now = time.time()
        if self.tty and self.status_width:
            self.out.write("\r" + " " * self.status_width + "\r")
            self.status_width = 0
        running = []
        for tid, line in sorted(self.stages.items(), key=lambda kv: kv[1].started or float("inf")):
            decile = int((line.progress or 0) // 10)
            seen = self.printed.get(tid)
            if line.state in FINAL_OK | FINAL_BAD:
                # A store hit is reported by a progress artifact, which may reach the API a little after the
                # state: a completed stage waits LOG_LAG_S before it is called "completed".
                settled = final or line.cached or line.state in FINAL_BAD or now - (line.finished or now) > LOG_LAG_S
                if settled and (seen is None or seen[0] != line.state):
                    self.out.write(("✓ " if line.state in FINAL_OK else "✗ ") + line.text(now) + "\n")
                    self.printed[tid] = (line.state, decile)
            elif line.state == "RUNNING":
                running.append(line)
                if not self.tty and (seen is None or seen[1] != decile):
                    self.out.write("… " + line.text(now) + "\n")
                    self.printed[tid] = (line.state, decile)
        if self.tty and running:
            status = " | ".join(line.text(now) for line in running)[:200]
            self.out.write(status)
            self.status_width = len(status)
        self.out.flush()

    def summary(self, final: str, started: float) -> str:
        reused = sum(1 for line in self.stages.values() if line.cached)
        done = sum(1 for line in self.stages.values() if line.state in FINAL_OK)
        begin, end = self.run_span
        took = (end or time.time()) - (begin or started)
        text = f"flow run {final.lower()} in {_duration(took)}: {done} stages completed"
        return text + (f", {reused} of them reused from the cache" if reused else "")


def follow(flow_run_id: UUID, *, interval: float = 2.0, out: TextIO = sys.stdout, tty: bool | None = None) -> int:
    """Render a flow run until it ends; 0 when it completed, 1 otherwise."""
    from prefect.client.orchestration import get_client

    started = time.time()
    with get_client(sync_client=True) as client:
        watcher = Watcher(client, flow_run_id, out, tty)
        while True:
            state = watcher.poll()
            watcher.render()
            if state in FINAL_OK | FINAL_BAD:
                time.sleep(min(LOG_LAG_S, 2.0))  # the last log lines (store hits) reach the API
                watcher.poll()  # task runs that ended in the last interval
                watcher.render(final=True)
                if watcher.tty and watcher.status_width:
                    out.write("\n")
                out.write(watcher.summary(state, started) + "\n")
                out.flush()
                return 0 if state in FINAL_OK else 1
            time.sleep(interval)


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.watch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a deployment run (FLOW/DEPLOYMENT) and follow it")
    run.add_argument("deployment")
    run.add_argument("--param", type=_param, action="append", default=[], help="KEY=VALUE (VALUE as JSON)")
    fol = sub.add_parser("follow", help="follow an existing flow run by id")
    fol.add_argument("flow_run_id", type=UUID)
    for p in (run, fol):
        p.add_argument("--interval", type=float, default=2.0, help="seconds between polls of the API")
    args = parser.parse_args(argv)
    if args.command == "run":
        from prefect.deployments import run_deployment

        flow_run = run_deployment(args.deployment, parameters=dict(args.param) or None, timeout=0)
        print(f"started {args.deployment}: flow run {flow_run.name} ({flow_run.id})", flush=True)
        return follow(flow_run.id, interval=args.interval)
    return follow(args.flow_run_id, interval=args.interval)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: a whole flow (default `pipeline`), cold (empty store) and warm (everything cached), with peak memory.

    .venv/bin/python benchmarks/pipeline.py --preset cpu     # goal: cold < 15 min, warm < 1 min on 2 cores
    .venv/bin/python benchmarks/pipeline.py --preset tiny    # about a minute
    .venv/bin/python benchmarks/pipeline.py --flow distill-krr --preset cpu   # any flow's budget (15 min)
    .venv/bin/python benchmarks/pipeline.py --flow prune-eval --preset cpu

It starts a private Prefect server (SQLite in a temporary PREFECT_HOME, free loopback port)
and an empty artifact store, runs the flow's module entry point (`python -m flows.pipeline
--preset P`) twice against them and samples the resident memory of the whole process tree
(flow process, Ray's GCS, raylet and workers) every 0.2 s. For the pipeline the accuracy table
is its own final report. The last line of output is one JSON object; each run is appended to
benchmarks/records/pipeline.jsonl (the pipeline) or flow_time.jsonl (other flows; --no-record
for smoke runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.records import append_record, loadavg  # noqa: E402
from flows.deployments import FLOWS  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api: str) -> bool:
    try:
        urllib.request.urlopen(api + "/health", timeout=2)
        return True
    except OSError:
        return False


class TreeMemory:
    """Peak summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def flow_command(flow: str) -> list[str]:
    """`python -m` arguments of a flow's module entry point (flows.deployments.FLOWS); a module that hosts
    several flows (flows.prune: prune, prune-eval) is told which one."""
    module = FLOWS[flow]["entrypoint"].split(":")[0]
    shared = sum(spec["entrypoint"].startswith(f"{module}:") for spec in FLOWS.values()) > 1
    return [module, *(["--flow", flow] if shared else [])]


def run_flow(flow: str, preset: str, env: dict[str, str]) -> tuple[float, int, dict]:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", *flow_command(flow), "--preset", preset],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    mem = TreeMemory(proc.pid)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    peak = mem.stop()
    if proc.returncode != 0:
        sys.exit(f"{flow} --preset {preset} failed ({proc.returncode}):\n{out[-4000:]}")
    if flow != "pipeline":  # only the pipeline ends with its report as one JSON line
        return seconds, peak, {}
    last = [line for line in out.splitlines() if line.startswith("{")]
    return seconds, peak, json.loads(last[-1]) if last else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "cpu", "paper"], default="cpu")
    parser.add_argument("--flow", choices=sorted(FLOWS), default="pipeline", help="the flow to time")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and Prefect home")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/records")
    args = parser.parse_args()
    load_start = loadavg()
    state = Path(tempfile.mkdtemp(prefix="distillery-bench-pipeline-"))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DISTILLERY_STORE": str(state / "artifacts"),
        "DISTILLERY_CACHE": str(state / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    server_log = open(state / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not _healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the Prefect server did not start")
            time.sleep(0.5)
        cold_s, cold_peak, report = run_flow(args.flow, args.preset, env)
        print(f"cold run: {cold_s:.1f} s, peak {cold_peak / 2**20:.0f} MiB", flush=True)
        warm_s, warm_peak, _ = run_flow(args.flow, args.preset, env)
        print(f"warm run: {warm_s:.1f} s, peak {warm_peak / 2**20:.0f} MiB", flush=True)
        store_bytes = sum(f.stat().st_size for f in (state / "artifacts").rglob("*") if f.is_file())
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        server_log.close()
        # SQLite contention shows as "database is locked" in the server's log (issue 16)
        locked = (state / "server.log").read_text(errors="replace").count("database is locked")
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    pipeline = args.flow == "pipeline"
    out = {
        "benchmark": "pipeline" if pipeline else "flow_time",
        "flow": args.flow,
        "preset": args.preset,
        "cold_s": round(cold_s, 1),
        "warm_s": round(warm_s, 1),
        "peak_rss_mib_cold": round(cold_peak / 2**20, 1),
        "peak_rss_mib_warm": round(warm_peak / 2**20, 1),
        "store_mib": round(store_bytes / 2**20, 2),
        "server_database_locked_errors": locked,
        "goal_cold_under_15_min": cold_s < 900,
        "goal_warm_under_1_min": warm_s < 60,
        **({"results": report.get("results", report), "notes": report.get("notes", [])} if pipeline else {}),
        "wall_note": "upper bound when loadavg exceeds the 2 cores (other processes shared them)",
    }
    if not args.no_record:
        append_record(out["benchmark"], out, preset=args.preset, loadavg_start=load_start)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()

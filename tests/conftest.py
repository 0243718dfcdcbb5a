"""Shared fixtures: the real data folder, a real Prefect server on a free loopback port.

The Prefect environment is fixed here, before anything imports prefect, so the test process,
the Prefect server, workers, flow-run subprocesses and Ray workers all talk to the one
server this session starts (a Ray worker without PREFECT_API_URL would start its own).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DISTILLERY_DATA", REPO.parent / "shared" / "data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STATE = Path(tempfile.mkdtemp(prefix="distillery-tests-"))
_PORT = _free_port()
os.environ.update(
    {
        "PREFECT_HOME": str(_STATE / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{_PORT}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(_PORT),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DISTILLERY_STORE": str(_STATE / "artifacts"),
        "DISTILLERY_CACHE": str(_STATE / "cache"),
        "DISTILLERY_RAY_NUM_CPUS": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAY_DEDUP_LOGS": "0",
    }
)


def data_path(*parts: str) -> Path:
    """A path under ../shared/data; skips the test with a clear reason when it is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set DISTILLERY_DATA or place ../shared/data beside the repo)")
    return path


def _healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def hf_datasets(tmp_path_factory):
    """`datasets`, offline (set above), caching under a temporary directory."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets, str(tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (SQLite in a temp PREFECT_HOME) for the whole test session."""
    api = os.environ["PREFECT_API_URL"]
    log = open(_STATE / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(_PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not _healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"Prefect server did not start:\n{(_STATE / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield api
    os.killpg(proc.pid, 15)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@pytest.fixture(scope="session")
def ray_logical_gpu():
    """Local Ray with 2 CPUs and one logical GPU, to test GPU scheduling on a CPU machine."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("PREFECT_", "DISTILLERY_"))}},
    )
    yield
    ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STATE, ignore_errors=True)

"""End to end: `prefect deploy` + a process worker + `prefect deployment run --watch` of baseline/tiny and
pipeline/tiny.

Everything is real: the session's Prefect server, a `prefect worker start` subprocess on a
process work pool, local Ray inside the flow run, Parquet artifacts on disk. The second run
must reuse every stage (content-addressed cache) and add no new artifact.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, data_path

POOL = "local"


def _prefect(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        log = Path(env.get("DISTILLERY_TEST_WORKER_LOG", "/nonexistent"))
        worker = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        pytest.fail(
            f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\nworker log:\n{worker}"
        )
    return proc


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    data_path("cifar10", "train.parquet")
    store = tmp_path_factory.mktemp("store")
    env = {
        **os.environ,
        "DISTILLERY_HOME": str(REPO),
        "DISTILLERY_STORE": str(store),
        "DISTILLERY_TEST_WORKER_LOG": str(store.parent / "worker.log"),
    }
    _prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=env)
    _prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=env)
    log = open(store.parent / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield env, store
    os.killpg(worker.pid, 15)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, 9)
    log.close()


async def _last_run(flow: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        run = runs[0]
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
        return run, task_runs, artifacts


def _artifacts(store: Path) -> dict[str, list[str]]:
    return {
        stage.name: sorted(p.name for p in stage.iterdir() if (p / "manifest.json").exists())
        for stage in store.iterdir()
        if stage.is_dir()
    }


@pytest.mark.integration
def test_deployment_run_baseline_tiny(deployed):
    env, store = deployed
    t0 = time.monotonic()
    _prefect("deployment", "run", "baseline/tiny", "--watch", env=env)
    first_s = time.monotonic() - t0

    run, task_runs, artifacts = asyncio.run(_last_run("baseline", "tiny"))
    assert run.state.is_completed(), run.state
    names = {t.name.split("-")[0] for t in task_runs}
    assert {"materialize", "random", "evaluate", "collect"} <= names
    keys = {a.key for a in artifacts if a.key}
    assert any(k.endswith("-summary") for k in keys), keys
    table = next(a for a in artifacts if a.key and a.key.endswith("-summary"))
    assert table.type == "table"

    stages = _artifacts(store)
    assert len(stages["dataset"]) == 1 and len(stages["random-real"]) == 1
    assert len(stages["eval"]) == 2  # num_models in the tiny preset
    assert len(stages["eval-metrics"]) == 1
    subset = store / "random-real" / stages["random-real"][0]
    assert (subset / "README.md").exists() and (subset / "preprocessor.safetensors").exists()
    assert not [p for p in (store / "eval").iterdir() if p.name.startswith(".tmp")]

    # Second run: same parameters, so every stage is reused from the store / Prefect cache; followed
    # the way `make demo` follows its run (flows.watch: one line per stage, not the event stream).
    t0 = time.monotonic()
    watch = subprocess.run(
        [sys.executable, "-m", "flows.watch", "run", "baseline/tiny", "--interval", "0.5"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    second_s = time.monotonic() - t0
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-3000:]
    lines = watch.stdout.splitlines()
    assert lines[0].startswith("started baseline/tiny") and "flow run completed" in lines[-1]
    assert any(line.startswith("✓ materialize-dataset:") for line in lines), lines
    assert len(lines) < 20, "one line per stage, not an event stream"
    run2, task_runs2, _ = asyncio.run(_last_run("baseline", "tiny"))
    assert run2.id != run.id and run2.state.is_completed()
    assert _artifacts(store) == stages, "a re-run must not create new artifacts"
    print(f"first run {first_s:.1f}s, second run {second_s:.1f}s")


@pytest.mark.integration
def test_deployment_run_pipeline_tiny(deployed):
    """The whole pipeline (prune -> teacher -> KRR-ST -> transfer beside experts -> TM) through a deployment."""
    data_path("tiny-imagenet-200", "train.parquet")
    env, store = deployed
    _prefect("deployment", "run", "pipeline/tiny", "--watch", env=env)
    run, task_runs, artifacts = asyncio.run(_last_run("pipeline", "tiny"))
    assert run.state.is_completed(), run.state
    names = {t.name for t in task_runs}
    for prefix in ("surrogate", "select", "ssl-teacher", "distill-krr-st", "expert-", "distill-tm", "pipeline-report"):
        assert any(n.startswith(prefix) for n in names), (prefix, sorted(names))
    keys = {a.key for a in artifacts if a.key}
    assert any(k.endswith("-report") for k in keys) and any(k.endswith("-report-plot") for k in keys), keys
    stages = _artifacts(store)
    assert len(stages["pipeline-report"]) == 1 and stages["krr-st"] and stages["distill-tm"] and stages["pruned"]

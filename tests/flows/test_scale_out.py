"""Scale-out, as far as one machine allows: a two-node Ray cluster, an S3 store, Prefect on PostgreSQL.

Each piece is real and reached the way a cluster reaches it, only on loopback:
- Ray: `ray start --head` and a second `ray start --address=...` node (1 CPU each, their own
  temp dir), the `baseline` flow run in a subprocess with `RAY_ADDRESS`; Ray's state API must
  show the flow's tasks finished on that cluster, and on both nodes.
- S3: a moto S3 server (`moto[server]`, offline) behind the standard AWS variables
  (`AWS_ENDPOINT_URL` for the endpoint); the artifact store publishes, verifies and lists
  through `s3://`, and the `baseline` flow writes all its stages there.
- PostgreSQL: a throw-away cluster (`initdb` as the `postgres` user when we are root) on a
  free port, a Prefect server on it via `PREFECT_API_DATABASE_CONNECTION_URL`, a flow run
  recorded there (checked through the REST API and in Postgres itself).
Only the fast S3 store test runs by default; the rest are `slow` (`make test-all`).
docs/scale-out.md is the matching step-by-step guide.

    .venv/bin/python -m pytest tests/flows/test_scale_out.py -m "" -q
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, data_path

BUCKET = "distillery"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ok, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} not up after {timeout:.0f}s\n{tail}")
        time.sleep(0.5)


def _kill_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Ends a process we started in its own session, and everything it started."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _run_flow(env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m flows.baseline --preset tiny` in a subprocess (its own Ray driver and environment)."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.baseline", "--preset", "tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"flow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


# ---------------------------------------------------------------- S3 (moto server)


@pytest.fixture(scope="module")
def s3_env():
    """A local S3 endpoint with one bucket; yields the AWS variables a client (or a Ray node) needs."""
    pytest.importorskip("s3fs", reason="s3fs missing: pip install -e '.[test]'")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] missing: pip install -e '.[test]'")
    import boto3
    import s3fs

    port = _free_port()
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",  # botocore (and so s3fs) read it
    }
    saved = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    # fsspec caches filesystem instances by their arguments: one made for another endpoint must go.
    s3fs.S3FileSystem.clear_instance_cache()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield aws
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _objects(prefix: str) -> dict[str, int]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_store_and_distilled_format_round_trip_on_s3(s3_env):
    import boto3
    import torch

    from distill.formats import read_distilled, write_distilled
    from tasks.store import ArtifactStore, StoreError

    store = ArtifactStore(f"s3://{BUCKET}/store")
    pixels = torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 0, 1])

    def write(staging):
        write_distilled(
            staging.path,
            pixels=pixels,
            labels=labels,
            class_names=["cat", "dog"],
            preprocessor_config={"kind": "normalize"},
            preprocessor_tensors={"mean": torch.zeros(3), "std": torch.ones(3)},
            recipe={"lr": 0.01},
            method="random-real",
            provenance={"test": True},
            learned_lr=0.01,
            filesystem=staging.fs,
        )
        return {"rows": len(pixels)}

    art = store.publish("random-real", "k0", write, config={"ipc": 2})
    assert art.uri == f"s3://{BUCKET}/store/random-real/k0" and store.list("random-real") == ["k0"]
    keys = _objects("store/")
    assert "store/random-real/k0/manifest.json" in keys
    assert not [k for k in keys if "/.tmp-" in k], "the staging copy must be gone from the bucket"
    assert set(art.manifest["files"]) <= {k.removeprefix("store/random-real/k0/") for k in keys}

    # A reader elsewhere (fresh store object) gets the exact tensors and the recipe back.
    again = ArtifactStore(f"s3://{BUCKET}/store").open("random-real", "k0", verify=True)
    got = read_distilled(again.path, filesystem=again.fs)
    assert torch.equal(got.pixels, pixels) and torch.equal(got.labels, labels) and got.learned_lr == 0.01
    assert torch.equal(got.preprocessor_tensors["std"], torch.ones(3))

    # Publishing the same key again reuses it; an object changed behind the store's back is caught.
    assert store.publish("random-real", "k0", lambda s: pytest.fail("must not rewrite")).key == "k0"
    data_key = next(k for k in keys if k.endswith(".parquet"))
    boto3.client("s3").put_object(Bucket=BUCKET, Key=data_key, Body=b"not parquet")
    with pytest.raises(StoreError, match="size|sha256"):
        store.open("random-real", "k0", verify=True)


@pytest.mark.slow
@pytest.mark.integration
def test_baseline_flow_writes_every_stage_to_s3(s3_env, prefect_server):
    data_path("cifar10", "train.parquet")
    env = {**os.environ, **s3_env, "DISTILLERY_STORE": f"s3://{BUCKET}/flow"}
    _run_flow(env)
    from tasks.store import ArtifactStore

    store = ArtifactStore(f"s3://{BUCKET}/flow")
    stages = {stage: store.list(stage) for stage in ("dataset", "random-real", "eval", "eval-metrics")}
    assert len(stages["dataset"]) == 1 and len(stages["random-real"]) == 1 and len(stages["eval-metrics"]) == 1
    assert len(stages["eval"]) == 2, stages  # num_models in the tiny preset
    for stage, keys in stages.items():
        for key in keys:
            store.open(stage, key, verify=True)  # every file there, sha256 as in its manifest
    assert not [k for k in _objects("flow/") if "/.tmp-" in k]


# ---------------------------------------------------------------- Ray cluster on loopback


def _ray_cmd() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a worker node (1 CPU each) on loopback, in their own temp dir and process groups.

    `ray stop` is never used: it ends every Ray process on the machine, other users' too.
    Teardown ends the two `ray start --block` process groups and then any process whose
    command line names this cluster's temp dir (raylets, GCS, workers), by pid.
    """
    # Short path: Ray's Unix sockets live under it and socket paths are limited to 107 bytes.
    temp = tempfile.mkdtemp(prefix="dray-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # Token auth is what `ray start` picks only when a token already sits in ~/.ray (left by some
    # earlier local ray.init); a fresh machine gets none, so the test pins that default.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus=1", "--num-gpus=0", "--temp-dir", temp, "--block", "--disable-usage-stats"]
    log = Path(temp) / "start.log"
    procs = []
    with open(log, "ab") as out:
        procs.append(
            subprocess.Popen(
                [
                    _ray_cmd(),
                    "start",
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    *common,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    address, dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
    try:
        _wait(lambda: _http_ok(f"{dashboard}/api/version"), "Ray head and dashboard", 180, log)
        with open(log, "ab") as out:
            procs.append(
                subprocess.Popen(
                    [_ray_cmd(), "start", f"--address={address}", "--node-ip-address=127.0.0.1", *common],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait(lambda: len(_alive_nodes(dashboard)) == 2, "second Ray node", 120, log)
        yield {"address": address, "dashboard": dashboard, "temp": temp, "env": {"RAY_AUTH_MODE": "disabled"}}
    finally:
        for proc in reversed(procs):
            _kill_group(proc, grace_s=5)  # a Ray node drains for 30 s on SIGTERM; nothing to drain here
        _kill_by_cmdline(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _http_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def _state(dashboard: str, resource: str, **params) -> list[dict]:
    """Ray's state API (served by the head's dashboard), e.g. nodes or tasks."""
    r = httpx.get(f"{dashboard}/api/v0/{resource}", params={"limit": 10000, "detail": "true", **params}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def _alive_nodes(dashboard: str) -> list[dict]:
    try:
        return [n for n in _state(dashboard, "nodes") if n["state"] == "ALIVE"]
    except (httpx.HTTPError, KeyError):
        return []


def _kill_by_cmdline(marker: str) -> None:
    from ray.thirdparty_files import psutil  # Ray ships its own copy

    mine = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in mine:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.mark.slow
@pytest.mark.integration
def test_flow_runs_its_tasks_on_a_two_node_ray_cluster(ray_cluster, prefect_server, tmp_path):
    data_path("cifar10", "train.parquet")
    nodes = {n["node_id"] for n in _alive_nodes(ray_cluster["dashboard"])}
    assert len(nodes) == 2
    jobs_before = {t["job_id"] for t in _state(ray_cluster["dashboard"], "tasks")}

    env = {
        **os.environ,
        **ray_cluster["env"],
        "RAY_ADDRESS": ray_cluster["address"],
        "DISTILLERY_STORE": str(tmp_path / "store"),
    }
    proc = _run_flow(env)
    assert "Started a local Ray instance" not in proc.stderr, "the flow must join the cluster, not start its own Ray"

    tasks = [t for t in _state(ray_cluster["dashboard"], "tasks") if t["job_id"] not in jobs_before]
    names = {t["name"] for t in tasks}
    assert {"materialize-dataset", "random-real-subset", "evaluate", "collect-metrics"} <= names, names
    assert all(t["state"] == "FINISHED" for t in tasks), [(t["name"], t["state"]) for t in tasks]
    used = {t["node_id"] for t in tasks}
    assert used <= nodes, "tasks ran on a node outside the cluster"
    # The two evaluation runs (1 CPU each) are submitted together and each node has 1 CPU.
    assert used == nodes, f"tasks ran on {len(used)} of the cluster's 2 nodes: {sorted(names)}"
    print(f"{len(tasks)} Ray tasks on {len(used)} nodes: {sorted(names)}")


# ---------------------------------------------------------------- Prefect server on PostgreSQL


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found or not found[-1]:
        pytest.skip(f"PostgreSQL's {name} not found (apt-get install postgresql, or scripts/install.sh as root)")
    return found[-1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL cluster on a free loopback port; yields its asyncpg URL."""
    pytest.importorskip("asyncpg", reason="asyncpg missing (it comes with prefect)")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    root = os.geteuid() == 0
    if root:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")  # postgres refuses to run as root
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    # Not under pytest's tmp dir: that one is private to root and the postgres user must enter it.
    base = Path(tempfile.mkdtemp(prefix="distillery-pg-"))
    data, log = base / "data", base / "postgres.log"
    if root:
        os.chown(base, pw.pw_uid, pw.pw_gid)

    def as_owner(*cmd: str) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "postgres", "--", *cmd] if root else list(cmd)
        return subprocess.run(full, capture_output=True, text=True, timeout=120)

    port = _free_port()
    started = False
    try:
        done = as_owner(initdb, "-D", str(data), "-U", "prefect", "-A", "trust", "-E", "UTF8", "--no-sync")
        assert done.returncode == 0, f"initdb failed: {done.stderr}"
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = as_owner(pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
        assert done.returncode == 0, f"pg_ctl start failed: {done.stderr}\n{log.read_text() if log.exists() else ''}"
        started = True
        done = as_owner(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        assert done.returncode == 0, f"createdb failed: {done.stderr}"
        yield {"url": f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect", "port": port, "as_owner": as_owner}
    finally:
        if started:
            as_owner(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


_TINY_FLOW = """
from prefect import flow, task
from prefect.artifacts import create_table_artifact

@task
def square(x: int) -> int:
    return x * x

@flow(name="postgres-smoke")
def smoke() -> int:
    total = sum(square(i) for i in range(4))
    create_table_artifact(table=[{"total": total}], key="postgres-smoke")
    return total

print("TOTAL", smoke())
"""


@pytest.mark.slow
@pytest.mark.integration
def test_prefect_server_on_postgres_records_a_flow_run(postgres, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres["url"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(lambda: _http_ok(f"{api}/health"), "Prefect server on PostgreSQL", 180, log)
        done = subprocess.run(
            [sys.executable, "-c", _TINY_FLOW], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert done.returncode == 0 and "TOTAL 14" in done.stdout, done.stderr[-3000:]

        runs = (
            httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": ["postgres-smoke"]}}}, timeout=30)
            .raise_for_status()
            .json()
        )
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", runs
        # The run lives in PostgreSQL itself, not in a SQLite file beside the server.
        query = (
            "select f.name, r.state_type, (select count(*) from task_run t where t.flow_run_id = r.id) "
            "from flow_run r join flow f on f.id = r.flow_id"
        )
        psql = postgres["as_owner"](
            _pg_bin("psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(postgres["port"]),
            "-U",
            "prefect",
            "-d",
            "prefect",
            "-At",
            "-c",
            query,
        )
        assert psql.stdout.split() == ["postgres-smoke|COMPLETED|4"], psql.stdout + psql.stderr
        assert not list((tmp_path / "prefect").glob("*.db")), "a SQLite database was created"
    finally:
        _kill_group(server)

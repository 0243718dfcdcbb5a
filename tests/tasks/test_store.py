"""Tests of the artifact store: stable keys, atomic publish, crash and race safety, verification."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from pydantic import BaseModel

from tasks.store import (
    FORMAT_VERSION,
    SUPPORTED_SCHEMES,
    ArtifactStore,
    Staging,
    StoreError,
    artifact_key,
    store_cache_key_fn,
)

REPO = Path(__file__).resolve().parents[2]


class Cfg(BaseModel):
    lr: float = 0.01
    steps: int = 10


@dataclass(frozen=True)
class DCfg:
    lr: float = 0.01
    steps: int = 10


def write_two_files(staging: Staging, payload: bytes = b"hello") -> dict:
    staging.fs.create_dir(staging.file("data"))
    with staging.fs.open_output_stream(staging.file("data/part-0.bin")) as f:
        f.write(payload)
    with staging.fs.open_output_stream(staging.file("notes.txt")) as f:
        f.write(b"notes")
    return {"rows": 7}


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    return ArtifactStore(f"memory://test-{uuid.uuid4().hex}/store")


# ---------------------------------------------------------------- keys


def test_key_is_stable_across_processes():
    key = artifact_key("experts", {"lr": 0.01, "steps": 10}, ["abc", "def"])
    code = (
        "from tasks.store import artifact_key; "
        "print(artifact_key('experts', {'steps': 10, 'lr': 0.01}, ['abc', 'def']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key
    assert len(key) == 16 and int(key, 16) >= 0


def test_key_changes_with_every_ingredient():
    base = artifact_key("experts", {"lr": 0.01}, ["a", "b"])
    others = {
        artifact_key("distill", {"lr": 0.01}, ["a", "b"]),
        artifact_key("experts", {"lr": 0.02}, ["a", "b"]),
        artifact_key("experts", {"lr": 0.01}, ["b", "a"]),  # inputs are ordered
        artifact_key("experts", {"lr": 0.01}, ["a"]),
        artifact_key("experts", {"lr": 0.01}, ["a", "b"], version=FORMAT_VERSION + 1),
    }
    assert base not in others and len(others) == 5


def test_key_accepts_pydantic_dataclass_and_dict_alike():
    as_dict = artifact_key("s", {"lr": 0.01, "steps": 10})
    assert artifact_key("s", Cfg()) == as_dict == artifact_key("s", DCfg())
    assert ArtifactStore("memory://k").key("s", Cfg()) == as_dict
    with pytest.raises(TypeError, match="not a JSON value"):
        artifact_key("s", {"x": object()})


def test_cache_key_fn_offers_the_artifact_key_once_published(store):
    fn = store_cache_key_fn("experts", lambda p: (store.uri, store.key("experts", p["cfg"])))
    key = store.key("experts", {"lr": 1})
    assert fn(None, {"cfg": {"lr": 1}}) is None, "no cache key while the artifact is missing"
    store.publish("experts", key, lambda st: st.fs.open_output_stream(st.file("a")).close())
    assert fn(None, {"cfg": {"lr": 1}}) == f"experts-{key}"


# ---------------------------------------------------------------- publish / open


def test_publish_open_exists(store):
    key = store.key("experts", Cfg(), ["up1"])
    assert not store.exists("experts", key) and store.list("experts") == []
    art = store.publish(
        "experts", key, write_two_files, config=Cfg(), inputs=["up1"], seeds=[0, 1], extra={"note": "x"}
    )
    assert store.exists("experts", key) and store.list("experts") == [key]
    assert art.uri == store.uri_of("experts", key) == f"{store.uri}/experts/{key}"
    m = store.open("experts", key).manifest
    assert m == art.manifest == store.manifest("experts", key)
    assert set(m["files"]) == {"data/part-0.bin", "notes.txt"}
    assert m["files"]["notes.txt"]["bytes"] == 5
    assert (m["rows"], m["inputs"], m["config"], m["seeds"], m["note"]) == (7, ["up1"], Cfg().model_dump(), [0, 1], "x")
    assert m["versions"]["pyarrow"] and m["versions"]["python"] and m["wall_time_s"] >= 0
    with art.fs.open_input_stream(art.file("data/part-0.bin")) as f:
        assert f.read() == b"hello"
    assert (art.local_path() is not None) == store.local


def test_publish_skips_write_when_it_exists(store):
    store.publish("s", "k", write_two_files)

    def must_not_run(staging):
        raise AssertionError("write called for an existing artifact")

    art = store.publish("s", "k", must_not_run)
    assert art.manifest["rows"] == 7


def test_failing_writer_leaves_nothing(store):
    def broken(staging):
        write_two_files(staging)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        store.publish("s", "k", broken)
    assert not store.exists("s", "k") and store.list("s") == []
    leftovers = store.fs.get_file_info(pafs.FileSelector(f"{store.root}/s", allow_not_found=True))
    assert leftovers == []


def test_writer_may_not_write_the_manifest(store):
    def sneaky(staging):
        with staging.fs.open_output_stream(staging.file("manifest.json")) as f:
            f.write(b"{}")

    with pytest.raises(StoreError, match="manifest.json"):
        store.publish("s", "k", sneaky)
    assert not store.exists("s", "k")


def test_corrupted_file_fails_verification(store):
    art = store.publish("s", "k", write_two_files)
    path = art.file("data/part-0.bin")
    with store.fs.open_output_stream(path) as f:
        f.write(b"hellO")  # same size, one byte changed
    store.open("s", "k", verify=False)
    with pytest.raises(StoreError, match=r"data/part-0\.bin.*sha256"):
        store.open("s", "k")
    store.fs.delete_file(path)
    with pytest.raises(StoreError, match=r"data/part-0\.bin.*missing"):
        store.open("s", "k")


def test_missing_artifact_and_bad_manifest(tmp_path):
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(StoreError, match="no artifact s/nope.*not finished"):
        store.open("s", "nope")
    (tmp_path / "s" / "bad").mkdir(parents=True)
    (tmp_path / "s" / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.open("s", "bad")
    with pytest.raises(StoreError, match="invalid key"):
        store.exists("s", "../escape")


def test_directory_without_manifest_does_not_exist(tmp_path):
    store = ArtifactStore(str(tmp_path))
    (tmp_path / "s" / "k").mkdir(parents=True)
    (tmp_path / "s" / "k" / "data.bin").write_bytes(b"half")
    assert not store.exists("s", "k") and store.list("s") == []
    with pytest.raises(StoreError, match="without a manifest.json"):
        store.publish("s", "k", write_two_files)


def test_unknown_scheme_lists_supported():
    with pytest.raises(StoreError, match="ftpx") as info:
        ArtifactStore("ftpx://a")
    assert all(s in str(info.value) for s in SUPPORTED_SCHEMES)


def test_default_uri_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_STORE", str(tmp_path / "env-store"))
    assert ArtifactStore().uri == str(tmp_path / "env-store")
    monkeypatch.delenv("DISTILLERY_STORE")
    monkeypatch.chdir(tmp_path)
    assert ArtifactStore().uri == str(tmp_path / "artifacts")
    assert ArtifactStore(f"file://{tmp_path}/x").uri == str(tmp_path / "x")


# ---------------------------------------------------------------- crashes and races (separate processes)


def _slow_publish(root: str, inside: str, label: str, sleep_s: float, barrier, results) -> None:
    """Publish s/k from a child process; `inside` is touched once write() has begun."""

    def write(staging: Staging) -> dict:
        write_two_files(staging, payload=label.encode() * 1000)
        Path(inside).touch()
        time.sleep(sleep_s)
        return {"writer": label}

    if barrier is not None:
        barrier.wait(timeout=60)  # both writers enter publish() together
    art = ArtifactStore(root).publish("s", "k", write)
    if results is not None:
        results.put(art.manifest["writer"])


def test_killed_writer_leaves_no_artifact(tmp_path):
    root, inside = str(tmp_path / "store"), str(tmp_path / "inside")
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_slow_publish, args=(root, inside, "A", 60.0, None, None))
    proc.start()
    deadline = time.time() + 30
    while not os.path.exists(inside):
        assert time.time() < deadline and proc.is_alive(), "writer never started"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)

    store = ArtifactStore(root)
    assert not store.exists("s", "k") and store.list("s") == []
    with pytest.raises(StoreError):
        store.open("s", "k")
    art = store.publish("s", "k", write_two_files)
    assert store.list("s") == ["k"] and art.manifest["rows"] == 7
    removed = store.gc_tmp(older_than_s=0)
    assert len(removed) == 1 and "/.tmp-k-" in removed[0]
    assert store.gc_tmp(older_than_s=0) == [] and store.list("s") == ["k"]


def test_gc_keeps_recent_tmp(tmp_path):
    store = ArtifactStore(str(tmp_path))
    (tmp_path / "s" / ".tmp-k-123").mkdir(parents=True)
    assert store.gc_tmp(older_than_s=3600) == []
    assert (tmp_path / "s" / ".tmp-k-123").exists()


def test_concurrent_writers_end_with_one_complete_artifact(tmp_path):
    root = str(tmp_path / "store")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_slow_publish, args=(root, str(tmp_path / f"in-{w}"), w, 0.5, barrier, results))
        for w in ("A", "B")
    ]
    for p in procs:
        p.start()
    winners = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert os.path.exists(tmp_path / "in-A") and os.path.exists(tmp_path / "in-B")  # both really wrote
    store = ArtifactStore(root)
    assert store.list("s") == ["k"]
    art = store.open("s", "k", verify=True)
    assert winners[0] == winners[1] == art.manifest["writer"]
    assert sorted(os.listdir(Path(root) / "s")) == ["k"]  # the loser's temp dir is gone
    payload = (Path(root) / "s" / "k" / "data" / "part-0.bin").read_bytes()
    assert payload == art.manifest["writer"].encode() * 1000
    assert json.loads((Path(root) / "s" / "k" / "manifest.json").read_text())["key"] == "k"


# ---------------------------------------------------------------- untrusted manifests


def _plant(store: ArtifactStore, key: str, name: str, payload: bytes = b"planted") -> None:
    """Rewrite a published manifest as an attacker with write access to the store would:
    add a file entry under `name`, with a correct hash of the attacker's own bytes."""
    import hashlib

    from distill.fsio import read_json, write_json
    from distill.manifest import seal

    path = f"{store.root}/s/{key}/manifest.json"
    manifest = read_json(store.fs, path)
    manifest["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    write_json(store.fs, path, seal(manifest))  # an attacker can recompute the digest too


@pytest.mark.parametrize(
    "name",
    [
        "../../../escaped.txt",
        "/tmp/distillery-escaped.txt",
        "data/../../escaped.txt",
        "./notes.txt",
        "data//part-0.bin",
        "a\\..\\b",
        "manifest.json",
        "",
    ],
)
def test_manifest_names_outside_the_artifact_are_refused(tmp_path, monkeypatch, name):
    """Issue 12 part 1: a remote manifest naming '..', absolute or unnormalized paths must
    neither be copied into the local cache nor make any file appear outside it."""
    from tasks.artifacts import ArtifactRef

    cache = tmp_path / "cache"
    monkeypatch.setenv("DISTILLERY_CACHE", str(cache))
    store = ArtifactStore(f"memory://test-{uuid.uuid4().hex}/store")
    store.publish("s", "k1", write_two_files)
    _plant(store, "k1", name)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(StoreError, match="refusing file name"):
        ArtifactRef(store=store.uri, stage="s", key="k1").local_dir()
    with pytest.raises(StoreError, match="refusing file name"):
        store.open("s", "k1", verify=False)
    assert not Path("/tmp/distillery-escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    left = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert left == set(), f"files appeared: {left}"


def test_remote_copy_is_exact_and_checked(tmp_path, monkeypatch):
    from tasks.artifacts import ArtifactRef

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(f"memory://test-{uuid.uuid4().hex}/store")
    store.publish("s", "k1", write_two_files)
    local = ArtifactRef(store=store.uri, stage="s", key="k1").local_dir()
    assert (local / "data/part-0.bin").read_bytes() == b"hello"
    assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["notes.txt", "part-0.bin"]
    assert [p.name for p in local.parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_symlinked_member_of_a_local_artifact_is_refused(tmp_path):
    """A local artifact whose listed file was replaced by a link (even one whose target has
    the right hash) is refused rather than read through the link."""
    store = ArtifactStore(str(tmp_path / "store"))
    art = store.publish("s", "k1", write_two_files)
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"notes")  # same bytes, so only the link itself gives it away
    member = Path(art.path) / "notes.txt"
    member.unlink()
    member.symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        store.open("s", "k1")
    # a linked directory on the way is refused too
    data = Path(art.path) / "data"
    real = tmp_path / "elsewhere"
    data.rename(real)
    data.symlink_to(real)
    member.unlink()
    member.write_bytes(b"notes")
    with pytest.raises(StoreError, match="symbolic link"):
        store.open("s", "k1")


# ---------------------------------------------------------------- broken artifacts (issue 12 part 2-3)


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


def test_edited_manifest_is_detected(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    art = store.publish("s", "k1", write_two_files, config=Cfg())
    path = Path(art.path) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["lr"] = 1000.0  # acted on downstream if undetected
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="edited or damaged"):
        store.open("s", "k1", verify=False)
    assert not store.exists("s", "k1")


def test_cache_hit_over_a_truncated_artifact_recomputes(tmp_path):
    """Old behaviour: a hit only looked for manifest.json, so a truncated file was reused."""
    store = ArtifactStore(str(tmp_path / "store"))
    art = store.publish("s", "k1", write_two_files)
    (Path(art.path) / "data/part-0.bin").write_bytes(b"he")
    assert store.problem("s", "k1") and "size 2 bytes" in store.problem("s", "k1")
    assert not store.exists("s", "k1")
    calls = []
    with pytest.warns(UserWarning, match="replacing broken artifact"):
        store.publish("s", "k1", lambda st: calls.append(1) or write_two_files(st))
    assert calls == [1]
    assert (Path(store.open("s", "k1").path) / "data/part-0.bin").read_bytes() == b"hello"


def test_bit_flip_is_a_hit_at_size_level_and_a_miss_at_hash_level(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "store"))
    art = store.publish("s", "k1", write_two_files)
    _flip_first_byte(Path(art.path) / "notes.txt")
    assert store.exists("s", "k1")  # the cheap default check sees sizes only
    with pytest.raises(StoreError, match="sha256"):
        store.open("s", "k1")  # but every read of the files checks every byte
    monkeypatch.setenv("DISTILLERY_VERIFY", "hash")
    assert not store.exists("s", "k1")
    monkeypatch.setenv("DISTILLERY_VERIFY", "bogus")
    with pytest.raises(StoreError, match="valid: none, size, hash"):
        store.exists("s", "k1")


def test_cache_key_fn_offers_no_key_for_a_broken_artifact(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    art = store.publish("s", "k1", write_two_files)
    fn = store_cache_key_fn("s", lambda p: (store.uri, "k1"))
    assert fn(None, {}) == "s-k1"
    (Path(art.path) / "notes.txt").unlink()
    assert fn(None, {}) is None


def test_store_cli_verify_gc_rm(tmp_path):
    from tasks.store import main

    uri = str(tmp_path / "store")
    store = ArtifactStore(uri)
    store.publish("s", "good", write_two_files)
    bad = store.publish("s", "bad", write_two_files)
    _flip_first_byte(Path(bad.path) / "notes.txt")
    stale = Path(uri) / "s" / ".tmp-dead-writer"
    stale.mkdir()
    (stale / "part").write_bytes(b"x")
    os.utime(stale / "part", (time.time() - 7200, time.time() - 7200))
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    assert main(["--store", uri, "verify"]) == 1
    assert main(["--store", uri, "verify", "--level", "size"]) == 0  # a flip keeps the size
    assert main(["--store", uri, "gc", "--older-than-hours", "1"]) == 0
    assert not stale.exists()
    assert main(["--store", uri, "rm", "s", "bad"]) == 0
    assert main(["--store", uri, "rm", "s", "bad"]) == 2
    assert main(["--store", uri, "verify"]) == 0
    assert store.list("s") == ["good"]
    out = subprocess.run(
        [sys.executable, "-m", "tasks.store", "--store", uri, "verify"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "1 intact, 0 broken" in out.stdout


def test_remote_cache_copy_damaged_locally_is_fetched_again(tmp_path, monkeypatch):
    from tasks.artifacts import ArtifactRef

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(f"memory://test-{uuid.uuid4().hex}/store")
    store.publish("s", "k1", write_two_files)
    ref = ArtifactRef(store=store.uri, stage="s", key="k1")
    local = ref.local_dir()
    (local / "notes.txt").write_bytes(b"no")
    assert (ref.local_dir() / "notes.txt").read_bytes() == b"notes"

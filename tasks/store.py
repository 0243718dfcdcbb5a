"""Content-addressed artifact store: every stage output at `<store>/<stage>/<key>/`.

`key` hashes (stage, config, upstream keys, format version), so the same parameters
always name the same directory and a re-run finds finished stages; Prefect's task cache
uses the same key (`store_cache_key_fn`), never hashes of tensors.

Publishing writes into a temporary sibling `.tmp-<key>-<uuid>`, hashes every file, writes
`manifest.json` last and renames the directory into place, so an artifact appears whole
or not at all: a directory without a manifest does not exist, whatever it holds (a killed
writer leaves only a `.tmp-*` directory, which `gc_tmp` removes). On a local disk the
rename is atomic and exactly one of several racing writers wins. Object stores (s3://,
gs://, memory://) cannot rename atomically, so the files are copied into place first and
the manifest last; racing writers of one key there end with the last one's files, which
`open(verify=True)` checks against the manifest.

The root is `DISTILLERY_STORE` (default `./artifacts`) or any fsspec URI; files are
reached through a `pyarrow.fs.FileSystem`, which `distill.formats` writes to directly.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import posixpath
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

import fsspec
import pyarrow.fs as pafs
from pydantic import BaseModel

from distill.fsio import FORMAT_VERSION, read_json, write_json

__all__ = [
    "FORMAT_VERSION", "SUPPORTED_SCHEMES", "StoreError", "Staging", "Artifact", "ArtifactStore",
    "artifact_key", "store_cache_key_fn", "safe_member_name",
]

# "file" and bare paths are local; the rest go through fsspec (s3 needs s3fs, gs gcsfs, ...).
SUPPORTED_SCHEMES = ("file", "memory", "s3", "gs", "gcs", "az", "abfs", "hdfs")
MANIFEST = "manifest.json"
_CHUNK = 1 << 20  # bytes per read while hashing: constant memory for any file size
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(RuntimeError):
    """A missing, incomplete or corrupt artifact, or an unusable store URI."""


def safe_member_name(name: Any, where: str) -> str:
    """`name` if it is a plain relative path inside an artifact directory, else a `StoreError`.

    Whoever can write a manifest also writes its hashes, so hashes cannot protect readers
    from the file names: a name that is absolute, climbs with '..', is not in normal form,
    uses backslashes or control characters, or names the manifest itself could make a reader
    (the remote-store cache copy above all) read or write outside the artifact.
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "not a non-empty string"
    elif name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        problem = "an absolute path"
    elif "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a backslash or a control character"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "not a normalized relative path (empty, '.' or '..' component)"
    elif name == MANIFEST:
        problem = f"the store's own {MANIFEST}"
    if problem:
        raise StoreError(f"{where}: refusing file name {name!r} in the manifest: {problem}")
    return name


def _jsonable(obj: Any) -> Any:
    """Config -> plain JSON values; refuses objects whose text form is not stable."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return _jsonable(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"not a JSON value (config, seeds, manifest): {type(obj).__name__} {obj!r}")


def artifact_key(stage: str, config: Any, inputs: Sequence[str] = (), version: int = FORMAT_VERSION) -> str:
    """16 hex chars of sha256 over canonical JSON; stable across processes (no `hash()`)."""
    payload = {"stage": stage, "config": _jsonable(config), "inputs": list(inputs), "version": version}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class Staging:
    """Where a writer puts its files during `publish` (a temporary directory)."""

    fs: pafs.FileSystem
    path: str

    def file(self, name: str) -> str:
        return posixpath.join(self.path, name)


@dataclass
class Artifact:
    """A published, complete stage output."""

    stage: str
    key: str
    uri: str
    fs: pafs.FileSystem
    path: str
    manifest: dict

    def file(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def local_path(self) -> str | None:
        return self.path if isinstance(self.fs, pafs.LocalFileSystem) else None


def _task_elapsed_s() -> float | None:
    """Seconds since the current Prefect task run started; None outside a task run."""
    try:
        from prefect.context import TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency of the tasks layer
        return None
    ctx = TaskRunContext.get()
    start = ctx.task_run.start_time if ctx is not None else None
    return round((datetime.now(timezone.utc) - start).total_seconds(), 3) if start is not None else None


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _escapes(root: str, name: str) -> bool:
    """True when `root/name` is a symbolic link or resolves outside `root` (a planted link)."""
    path = os.path.join(root, name)
    return os.path.islink(path) or os.path.commonpath(
        [os.path.realpath(root), os.path.realpath(path)]) != os.path.realpath(root)


def _files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    packages = {d: version(d) for d in ("torch", "pyarrow", "distillery")}
    return {"python": platform.python_version(), **packages}


@functools.cache
def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, root path inside it, normalized uri) for a store URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme == "file":
        root = os.path.abspath(os.path.expanduser(rest if sep else uri))
        return pafs.LocalFileSystem(), root, root
    if scheme not in SUPPORTED_SCHEMES:
        raise StoreError(
            f"unknown store scheme {scheme!r} in {uri!r}; supported: {', '.join(SUPPORTED_SCHEMES)}"
        )
    try:
        fs = fsspec.filesystem(scheme)
    except ImportError as e:
        raise StoreError(f"store {uri!r} needs an fsspec backend that is not installed: {e}") from e
    root = fs._strip_protocol(uri).rstrip("/")
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root, uri.rstrip("/")


class ArtifactStore:
    """Publish and open stage outputs under a root URI."""

    def __init__(self, uri: str | None = None):
        uri = uri or os.environ.get("DISTILLERY_STORE") or "./artifacts"
        self.fs, self.root, self.uri = _filesystem(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    def key(self, stage: str, config: Any, inputs: Sequence[str] = ()) -> str:
        return artifact_key(stage, config, inputs)

    def uri_of(self, stage: str, key: str) -> str:
        return f"{self.uri}/{stage}/{key}"

    def _dir(self, stage: str, key: str) -> str:
        for what, name in (("stage", stage), ("key", key)):
            if not _NAME.match(name):
                raise StoreError(f"invalid {what} {name!r}: use letters, digits, '_', '.', '-'")
        return posixpath.join(self.root, stage, key)

    def exists(self, stage: str, key: str) -> bool:
        path = posixpath.join(self._dir(stage, key), MANIFEST)
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def manifest(self, stage: str, key: str) -> dict:
        path = posixpath.join(self._dir(stage, key), MANIFEST)
        try:
            manifest = read_json(self.fs, path)
        except FileNotFoundError as e:
            raise StoreError(
                f"no artifact {stage}/{key} in {self.uri}: {MANIFEST} is missing "
                "(never published, or its writer has not finished or was killed)"
            ) from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.uri_of(stage, key)}/{MANIFEST}: not valid JSON ({e})") from e
        identity = (manifest.get("stage"), manifest.get("key"))
        if identity != (stage, key) or not isinstance(manifest.get("files"), dict):
            raise StoreError(
                f"{self.uri_of(stage, key)}/{MANIFEST}: bad manifest (wrong stage/key or no files)"
            )
        where = f"artifact {stage}/{key} in {self.uri}"
        for name, entry in manifest["files"].items():
            safe_member_name(name, where)
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0):
                raise StoreError(f"{where}: manifest entry for {name!r} lacks a sha256 and a byte count")
        return manifest

    def open(self, stage: str, key: str, *, verify: bool = True) -> Artifact:
        """The artifact; with `verify`, every file's size and sha256 are checked first."""
        manifest = self.manifest(stage, key)
        art = Artifact(stage, key, self.uri_of(stage, key), self.fs, self._dir(stage, key), manifest)
        if verify:
            for name, expected in art.manifest["files"].items():
                self._verify_file(art, name, expected)
        return art

    def _verify_file(self, art: Artifact, name: str, expected: dict) -> None:
        where = f"{art.uri}/{name}"
        if self.local and _escapes(art.path, name):
            raise StoreError(f"{where}: is or passes through a symbolic link; refusing to follow it")
        info = self.fs.get_file_info(art.file(name))
        if info.type != pafs.FileType.File:
            raise StoreError(f"{where}: listed in the manifest but missing")
        if info.size != expected["bytes"]:
            raise StoreError(f"{where}: size {info.size} bytes, manifest says {expected['bytes']}")
        if _sha256(self.fs, art.file(name)) != expected["sha256"]:
            raise StoreError(f"{where}: sha256 does not match the manifest (file corrupted or modified)")

    def list(self, stage: str) -> list[str]:
        """Keys of the complete artifacts of a stage."""
        stage_dir = posixpath.join(self.root, stage)
        infos = self.fs.get_file_info(pafs.FileSelector(stage_dir, allow_not_found=True))
        names = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if not n.startswith(".") and self.exists(stage, n))

    def publish(
        self,
        stage: str,
        key: str,
        write: Callable[[Staging], dict | None],
        *,
        config: Any = None,
        inputs: Sequence[str] = (),
        seeds: Any = None,
        extra: dict | None = None,
    ) -> Artifact:
        """Run `write` into a temporary directory and publish the result atomically.

        An existing artifact is returned without calling `write`. If `write` raises,
        nothing becomes visible. Racing writers of one key return the same winner.
        """
        final = self._dir(stage, key)
        if self.exists(stage, key):
            return self.open(stage, key)
        tmp = posixpath.join(self.root, stage, f".tmp-{key}-{uuid.uuid4().hex}")
        self.fs.create_dir(tmp, recursive=True)
        try:
            start = time.time()
            result = write(Staging(self.fs, tmp)) or {}
            manifest = self._manifest(stage, key, tmp, config, inputs, seeds, time.time() - start)
            clash = set(manifest) & (set(result) | set(extra or {}))
            if clash:
                raise StoreError(f"writer of {stage}/{key} may not set the manifest keys {sorted(clash)}")
            manifest = {"rows": None, **_jsonable(extra or {}), **_jsonable(result), **manifest}
            if self.local:
                self._rename_into_place(stage, key, tmp, final, manifest)
            elif not self.exists(stage, key):
                self._copy_into_place(tmp, final, manifest)
        finally:
            if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                self.fs.delete_dir(tmp)
        return self.open(stage, key, verify=False)

    def _manifest(self, stage, key, tmp, config, inputs, seeds, wall_time_s) -> dict:
        files = {}
        for info in _files(self.fs, tmp):
            name = posixpath.relpath(info.path, tmp)
            if name == MANIFEST:
                raise StoreError(f"writer of {stage}/{key} wrote {MANIFEST} itself; the store owns that file")
            files[name] = {"sha256": _sha256(self.fs, info.path), "bytes": info.size}
        return {
            "stage": stage,
            "key": key,
            "format_version": FORMAT_VERSION,
            "inputs": list(inputs),
            "config": _jsonable(config),
            "files": files,
            "versions": _versions(),
            "git_revision": _git_revision(),
            "seeds": _jsonable(seeds),
            "wall_time_s": round(wall_time_s, 3),
            # The writing process's high-water mark (a Ray worker's spans the tasks it ran before):
            # an upper bound on the stage's own memory, cheap enough to record for every artifact.
            "peak_rss_mb": _peak_rss_mb(),
            # Most stages compute before they publish, so `wall_time_s` (the write alone) understates
            # their cost; the Prefect task run that publishes spans compute and write.
            "task_s": _task_elapsed_s(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _rename_into_place(self, stage: str, key: str, tmp: str, final: str, manifest: dict) -> None:
        write_json(self.fs, posixpath.join(tmp, MANIFEST), manifest)
        try:
            os.rename(tmp, final)  # atomic; fails when another writer's directory is there
        except OSError as e:
            if self.exists(stage, key):
                return  # another writer won the race; `publish` discards our copy
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise StoreError(
                    f"{final} exists without a {MANIFEST}, so it is no artifact, yet it blocks "
                    "publishing; this store never leaves such a directory: remove it"
                ) from e
            raise

    def _copy_into_place(self, tmp: str, final: str, manifest: dict) -> None:
        # Object stores have no atomic directory rename: the manifest goes last, so a
        # reader that sees it also sees every file it lists.
        for name in manifest["files"]:
            dest = posixpath.join(final, name)
            self.fs.create_dir(posixpath.dirname(dest), recursive=True)
            self.fs.copy_file(posixpath.join(tmp, name), dest)
        write_json(self.fs, posixpath.join(final, MANIFEST), manifest)

    def gc_tmp(self, older_than_s: float = 3600) -> list[str]:
        """Remove temporary directories of writers that died; returns the removed paths.

        Age is the newest modification inside, so a slow writer still appending to a
        file is never collected.
        """
        removed = []
        now = time.time()
        stages = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        for stage in (s for s in stages if s.type == pafs.FileType.Directory):
            for tmp in self.fs.get_file_info(pafs.FileSelector(stage.path)):
                is_tmp = posixpath.basename(tmp.path).startswith(".tmp-")
                if tmp.type != pafs.FileType.Directory or not is_tmp:
                    continue
                mtimes = [i.mtime for i in [tmp, *_files(self.fs, tmp.path)] if i.mtime is not None]
                if mtimes and now - max(mtimes).timestamp() >= older_than_s:
                    self.fs.delete_dir(tmp.path)
                    removed.append(tmp.path)
        return removed


def store_cache_key_fn(
    stage: str, key_of: Callable[[dict], tuple[str, str]]
) -> Callable[[Any, dict], str | None]:
    """A Prefect `cache_key_fn(context, parameters)` returning `<stage>-<artifact key>`.

    `key_of(parameters)` returns (store URI, artifact key) computed from the task's
    parameters, so a cached task and its stored output share one identity. The key is
    offered only once the artifact exists: Prefect's cache then never points at an output
    that was deleted or never published, and a task whose output is missing recomputes it
    (or finds it published meanwhile and returns at once).
    """

    def cache_key_fn(context: Any, parameters: dict) -> str | None:
        store_uri, key = key_of(parameters)
        if not ArtifactStore(store_uri).exists(stage, key):
            return None
        return f"{stage}-{key}"

    return cache_key_fn


def work_dir(store: str, stage: str, key: str) -> Path:
    """Where a long stage trains and checkpoints: persistent across task retries, outside the published
    tree (`<store>/.work/<stage>/<key>` for a local store, the local cache for a remote one)."""
    st = ArtifactStore(store)
    if st.local:
        root = Path(st.root) / ".work" / stage
    else:
        root = Path(os.environ.get("DISTILLERY_CACHE", Path(tempfile.gettempdir()) / "distillery-cache")) / "work" / stage
    path = root / key
    path.mkdir(parents=True, exist_ok=True)
    return path

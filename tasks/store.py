"""Content-addressed artifact store: every stage output at `<store>/<stage>/<key>/`.

`key` hashes (stage, config, upstream keys, format version), so the same parameters
always name the same directory and a re-run finds finished stages; Prefect's task cache
uses the same key (`store_cache_key_fn`), never hashes of tensors.

Publishing writes into a temporary sibling `.tmp-<key>-<uuid>`, hashes every file, writes
`manifest.json` last and renames the directory into place, so an artifact appears whole
or not at all: a directory without a manifest does not exist, whatever it holds (a killed
writer leaves only a `.tmp-*` directory, which `gc_tmp` removes).
Every manifest is sealed with its own digest, and every read checks it: a cache hit checks
the files' sizes (`DISTILLERY_VERIFY=hash` for every byte), an opened input every byte, and
a broken artifact counts as missing, so it is recomputed and replaced, never reused.
`python -m tasks.store verify|gc|rm` checks and tidies a whole store. On a local disk the
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
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

import fsspec
import pyarrow.fs as pafs
from pydantic import BaseModel

from distill.fsio import FORMAT_VERSION, peak_rss_mb, write_json
from distill.manifest import (
    DIGEST_FIELD,
    MANIFEST,
    VERIFY_LEVELS,
    IntegrityError,
    VerifyLevel,
    read_manifest,
    safe_member_name,
    seal,
    sha256_of,
    verify_files,
)

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_SCHEMES",
    "StoreError",
    "Staging",
    "Artifact",
    "ArtifactStore",
    "artifact_key",
    "store_cache_key_fn",
    "safe_member_name",
]

# "file" and bare paths are local; the rest go through fsspec (s3 needs s3fs, gs gcsfs, ...).
SUPPORTED_SCHEMES = ("file", "memory", "s3", "gs", "gcs", "az", "abfs", "hdfs")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StoreError(RuntimeError):
    """A missing, incomplete or corrupt artifact, or an unusable store URI."""


def cache_hit_level() -> VerifyLevel:
    """How much a cache hit checks before it is trusted (`DISTILLERY_VERIFY`, default "size").

    Sizes catch truncation and missing files for one stat per file; "hash" also reads every
    byte (bit flips), which costs a full read of large trajectory sets on every re-run.
    """
    level = os.environ.get("DISTILLERY_VERIFY", "size")
    if level not in VERIFY_LEVELS:
        raise StoreError(f"DISTILLERY_VERIFY={level!r} is not a verify level; valid: {', '.join(VERIFY_LEVELS)}")
    return level  # type: ignore[return-value]


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
        raise StoreError(f"unknown store scheme {scheme!r} in {uri!r}; supported: {', '.join(SUPPORTED_SCHEMES)}")
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

    def exists(self, stage: str, key: str, *, level: VerifyLevel | None = None) -> bool:
        """Whether a complete, intact artifact is there: its manifest present and sealed, and its
        files checked at `level` (default `cache_hit_level()`, sizes). A broken artifact does not
        exist: `publish` replaces it, and a cached task recomputes it."""
        return self.problem(stage, key, level=level) is None

    def problem(self, stage: str, key: str, *, level: VerifyLevel | None = None) -> str | None:
        """None for an intact artifact, else what is wrong with it ("missing" when never published)."""
        level = level or cache_hit_level()
        path = posixpath.join(self._dir(stage, key), MANIFEST)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return "missing"
        try:
            self.open(stage, key, verify=level)
        except StoreError as e:
            return str(e)
        return None

    def manifest(self, stage: str, key: str) -> dict:
        """The artifact's manifest, checked: sealed by its digest, identity, safe file names."""
        where = f"artifact {stage}/{key} in {self.uri}"
        try:
            manifest = read_manifest(
                self.fs,
                self._dir(stage, key),
                where,
                missing=(f"no artifact {stage}/{key} (never published, or its writer has not finished or was killed)"),
            )
        except IntegrityError as e:
            raise StoreError(str(e)) from e
        if (manifest.get("stage"), manifest.get("key")) != (stage, key):
            raise StoreError(
                f"{where}: its {MANIFEST} names another artifact ({manifest.get('stage')}/{manifest.get('key')})"
            )
        return manifest

    def open(self, stage: str, key: str, *, verify: bool | VerifyLevel = True) -> Artifact:
        """The artifact, its manifest checked; `verify` (True = "hash", "size", False = "none")
        also checks every listed file first."""
        level: VerifyLevel = "hash" if verify is True else "none" if verify is False else verify
        manifest = self.manifest(stage, key)
        art = Artifact(stage, key, self.uri_of(stage, key), self.fs, self._dir(stage, key), manifest)
        try:
            verify_files(self.fs, art.path, manifest, art.uri, level)
        except IntegrityError as e:
            raise StoreError(str(e)) from e
        return art

    def remove(self, stage: str, key: str) -> bool:
        """Take an artifact (intact or broken) out of the store; False when there was none.

        The manifest goes first, so from that moment no reader takes the rest for an artifact;
        on a local disk the directory is renamed aside in one step before it is deleted.
        """
        final = self._dir(stage, key)
        if self.fs.get_file_info(final).type == pafs.FileType.NotFound:
            return False
        if self.local:
            aside = posixpath.join(self.root, stage, f".tmp-removed-{key}-{uuid.uuid4().hex}")
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                return False  # someone else removed it first
            self.fs.delete_dir(aside)
            return True
        manifest = posixpath.join(final, MANIFEST)
        if self.fs.get_file_info(manifest).type == pafs.FileType.File:
            self.fs.delete_file(manifest)
        self.fs.delete_dir(final)
        return True

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
        trouble = self.problem(stage, key)
        if trouble is None:
            return self.open(stage, key, verify=cache_hit_level())
        if trouble != "missing":
            # A broken artifact is treated as missing: replaced by a fresh one, never reused.
            warnings.warn(f"replacing broken artifact {stage}/{key} in {self.uri}: {trouble}", stacklevel=2)
            self.remove(stage, key)
        tmp = posixpath.join(self.root, stage, f".tmp-{key}-{uuid.uuid4().hex}")
        self.fs.create_dir(tmp, recursive=True)
        try:
            start = time.time()
            result = write(Staging(self.fs, tmp)) or {}
            manifest = self._manifest(stage, key, tmp, config, inputs, seeds, time.time() - start)
            clash = (set(manifest) | {DIGEST_FIELD}) & (set(result) | set(extra or {}))
            if clash:
                raise StoreError(f"writer of {stage}/{key} may not set the manifest keys {sorted(clash)}")
            manifest = seal({"rows": None, **_jsonable(extra or {}), **_jsonable(result), **manifest})
            if self.local:
                self._rename_into_place(stage, key, tmp, final, manifest)
            elif self.problem(stage, key) is not None:
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
            files[name] = {"sha256": sha256_of(self.fs, info.path), "bytes": info.size}
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
            "peak_rss_mb": peak_rss_mb(),
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

    def stages(self) -> list[str]:
        """Stage folders under the root (the `.work` checkpoint tree excluded)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(
            posixpath.basename(i.path)
            for i in infos
            if i.type == pafs.FileType.Directory and _NAME.match(posixpath.basename(i.path))
        )

    def audit(
        self, level: VerifyLevel = "hash", stages: Sequence[str] | None = None
    ) -> list[tuple[str, str, str | None]]:
        """(stage, key, problem or None) for every artifact directory, published or broken.

        Unlike `list`, a directory whose manifest is damaged or missing is reported, not skipped.
        """
        rows = []
        for stage in stages or self.stages():
            stage_dir = posixpath.join(self.root, stage)
            infos = self.fs.get_file_info(pafs.FileSelector(stage_dir, allow_not_found=True))
            for info in sorted(infos, key=lambda i: i.path):
                key = posixpath.basename(info.path)
                if info.type == pafs.FileType.Directory and not key.startswith(".") and _NAME.match(key):
                    rows.append((stage, key, self.problem(stage, key, level=level)))
        return rows


_CLI_DOC = """Check and tidy an artifact store.

    python -m tasks.store verify [--store URI] [--level hash|size] [--stage S ...]
    python -m tasks.store gc [--store URI] [--older-than-hours 1] [--broken]
    python -m tasks.store rm STAGE KEY [--store URI]

verify: every artifact against its manifest; lists the broken ones and exits 1 if any.
gc: removes temporary directories of writers that died (older than the threshold) and,
with --broken, every artifact that fails verification at size level.
rm: removes one artifact (manifest first, so no reader sees half of it).
The store defaults to DISTILLERY_STORE or ./artifacts.
"""


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tasks.store", description=_CLI_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", help="store URI (default: DISTILLERY_STORE or ./artifacts)")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify every artifact; exit 1 when any is broken")
    verify.add_argument("--level", choices=[v for v in VERIFY_LEVELS if v != "none"], default="hash")
    verify.add_argument("--stage", action="append", help="only these stages (repeatable)")
    gc = sub.add_parser("gc", help="remove dead writers' temporary directories (and broken artifacts)")
    gc.add_argument("--older-than-hours", type=float, default=1.0)
    gc.add_argument("--broken", action="store_true", help="also remove artifacts that fail a size check")
    rm = sub.add_parser("rm", help="remove one artifact")
    rm.add_argument("stage")
    rm.add_argument("key")
    args = parser.parse_args(argv)
    try:
        store = ArtifactStore(args.store)
        if args.command == "verify":
            rows = store.audit(args.level, args.stage)
            broken = [(st, k, p) for st, k, p in rows if p is not None]
            for st, k, p in broken:
                print(f"BROKEN {st}/{k}: {p}")
            intact = len(rows) - len(broken)
            print(f"{intact} intact, {len(broken)} broken artifacts in {store.uri} ({args.level} check)")
            return 1 if broken else 0
        if args.command == "gc":
            if args.older_than_hours < 0:
                parser.error("--older-than-hours must be >= 0")
            removed = store.gc_tmp(args.older_than_hours * 3600)
            for path in removed:
                print(f"removed {path}")
            if args.broken:
                for st, k, p in store.audit("size"):
                    if p is not None and store.remove(st, k):
                        print(f"removed broken {st}/{k}: {p}")
            print(f"gc done: {len(removed)} temporary directories removed from {store.uri}")
            return 0
        if not store.remove(args.stage, args.key):
            print(f"error: no artifact {args.stage}/{args.key} in {store.uri}", file=sys.stderr)
            return 2
        print(f"removed {args.stage}/{args.key} from {store.uri}")
        return 0
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def store_cache_key_fn(stage: str, key_of: Callable[[dict], tuple[str, str]]) -> Callable[[Any, dict], str | None]:
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


def cache_root() -> Path:
    """This machine's cache of remote artifacts and work directories (`DISTILLERY_CACHE`)."""
    return Path(os.environ.get("DISTILLERY_CACHE", Path(tempfile.gettempdir()) / "distillery-cache"))


def work_dir(store: str, stage: str, key: str) -> Path:
    """Where a long stage trains and checkpoints: persistent across task retries, outside the published
    tree (`<store>/.work/<stage>/<key>` for a local store, the local cache for a remote one)."""
    st = ArtifactStore(store)
    if st.local:
        root = Path(st.root) / ".work" / stage
    else:
        root = cache_root() / "work" / stage
    path = root / key
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())

"""The artifact manifest: what a published folder promises, and the checks that hold it to it.

Every artifact folder (a stage output in the store, or a copy of one that a user downloaded)
carries `manifest.json`: the files it holds with their sha256 and size, the config and the
inputs that made it, and `manifest_sha256`, a digest of the manifest itself. The checks here
are the one place where "trust nothing on disk" is implemented; the store (`tasks.store`),
the remote-store cache copy (`tasks.artifacts`) and downstream loading
(`distill.downstream.load_distilled`, `python -m distill.train_on`) all call them.

What the checks catch: truncated, bit-flipped, missing or substituted files (size, then
sha256), an edited or truncated manifest (its own digest), and file names that would make a
reader step outside the folder (absolute, '..', unnormalized, links). What they cannot catch:
someone with write access who rewrites files, hashes and digest together; the digest is an
integrity check, not a signature.

Torch-free, so light command-line tools can verify a store.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import posixpath
import re
from typing import Any, Literal

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
DIGEST_FIELD = "manifest_sha256"
_CHUNK = 1 << 20  # bytes per read while hashing: constant memory for any file size

# "size": every listed file exists with its recorded size (a stat per file, cheap enough for
# every cache hit); "hash": sizes and sha256 of every byte; "none": the manifest alone.
VerifyLevel = Literal["none", "size", "hash"]
VERIFY_LEVELS: tuple[str, ...] = ("none", "size", "hash")


class IntegrityError(RuntimeError):
    """An artifact that does not match its manifest, or a manifest that cannot be trusted."""


def canonical_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its digest added (what a writer stores)."""
    return {**manifest, DIGEST_FIELD: canonical_digest(manifest)}


def safe_member_name(name: Any, where: str) -> str:
    """`name` if it is a plain relative path inside an artifact folder, else an `IntegrityError`.

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
        problem = f"the artifact's own {MANIFEST}"
    if problem:
        raise IntegrityError(f"{where}: refusing file name {name!r} in the manifest: {problem}")
    return name


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """The manifest if its digest matches and every file entry is well formed."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{where}: {MANIFEST} is not a manifest (no 'files' table)")
    recorded = manifest.get(DIGEST_FIELD)
    if recorded is None:
        raise IntegrityError(
            f"{where}: {MANIFEST} has no {DIGEST_FIELD} (written by an older version, or hand-made); "
            "re-create the artifact, or load it without verification"
        )
    if recorded != canonical_digest(manifest):
        raise IntegrityError(f"{where}: {MANIFEST} was edited or damaged after publishing (its digest does not match)")
    for name, entry in manifest["files"].items():
        safe_member_name(name, where)
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
            and entry["bytes"] >= 0
        ):
            raise IntegrityError(f"{where}: manifest entry for {name!r} lacks a sha256 and a byte count")
    return manifest


def sha256_of(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(source: str) -> list[tuple[str, str]]:
    """(name, path) of every file a local data source holds: the file itself (named by its base name), or
    every file under a folder (named by its path relative to it, '/'-separated), sorted; [] for a hub
    name or a remote URI, which are not files here."""
    if not os.path.exists(source):
        return []
    if os.path.isfile(source):
        return [(os.path.basename(source), source)]
    out = []
    for root, _, files in os.walk(source):
        for f in files:
            path = os.path.join(root, f)
            out.append((os.path.relpath(path, source).replace(os.sep, "/"), path))
    return sorted(out, key=lambda entry: pathlib.PurePath(entry[1]))  # by path parts: the order keys were made in


_SOURCE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def source_checksums(source: str) -> dict[str, str]:
    """sha256 of every file of a local data source, by `source_files` name (what `data.checksums` pins).
    Each (file, size, mtime) is hashed once per process: flows check a pinned source at validation and
    again where they decode it."""
    out = {}
    for name, path in source_files(source):
        st = os.stat(path)
        stamp = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        if stamp not in _SOURCE_DIGESTS:
            _SOURCE_DIGESTS[stamp] = sha256_of(pafs.LocalFileSystem(), stamp[0])
        out[name] = _SOURCE_DIGESTS[stamp]
    return out


def _is_link_or_escapes(root: str, name: str) -> bool:
    """True when `root/name` is a symbolic link or resolves outside `root` (a planted link)."""
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    return os.path.islink(path) or os.path.commonpath([real_root, os.path.realpath(path)]) != real_root


def verify_files(
    fs: pafs.FileSystem, root: str, manifest: dict[str, Any], where: str, level: VerifyLevel = "hash"
) -> None:
    """Check every file the manifest lists under `root` at `level`; raises `IntegrityError`."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"unknown verify level {level!r}; valid: {', '.join(VERIFY_LEVELS)}")
    if level == "none":
        return
    local = isinstance(fs, pafs.LocalFileSystem)
    for name, expected in manifest["files"].items():
        at = f"{where}/{name}"
        if local and _is_link_or_escapes(root, name):
            raise IntegrityError(f"{at}: is or passes through a symbolic link; refusing to follow it")
        path = posixpath.join(root, name)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise IntegrityError(f"{at}: listed in the manifest but missing")
        if info.size != expected["bytes"]:
            raise IntegrityError(
                f"{at}: size {info.size} bytes, manifest says {expected['bytes']} (truncated or replaced)"
            )
        if level == "hash" and sha256_of(fs, path) != expected["sha256"]:
            raise IntegrityError(f"{at}: sha256 does not match the manifest (file corrupted or modified)")


def read_manifest(fs: pafs.FileSystem, root: str, where: str, *, missing: str) -> dict[str, Any]:
    """Read and check `root/manifest.json`; `missing` explains what its absence means."""
    try:
        with fs.open_input_stream(posixpath.join(root, MANIFEST)) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError as e:
        raise IntegrityError(f"{where}: no {MANIFEST}, so {missing}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{where}/{MANIFEST}: not valid JSON ({e})") from e
    return check_manifest(manifest, where)


def verify_folder(path: str, level: VerifyLevel = "hash") -> dict[str, Any]:
    """Verify a local artifact folder (a store directory or a downloaded copy); returns its manifest.

    Files in the folder that the manifest does not list are ignored: they are not part of the
    artifact (a hub snapshot adds `.gitattributes`, for example) and no reader uses them.
    """
    root = os.path.abspath(path)
    manifest = read_manifest(
        pafs.LocalFileSystem(),
        root,
        root,
        missing="nothing says what this folder should hold; point at a folder "
        "published by distillery, or turn verification off",
    )
    verify_files(pafs.LocalFileSystem(), root, manifest, root, level)
    return manifest


def write_folder_manifest(path: str, **fields: Any) -> dict[str, Any]:
    """Hash every file under a local folder and write its sealed `manifest.json`; returns it.

    For sets written outside the artifact store (by hand, or by a script that calls
    `distill.formats` directly), so that they load with verification like published ones.
    """
    root = os.path.abspath(path)
    fs = pafs.LocalFileSystem()
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            name = os.path.relpath(full, root).replace(os.sep, "/")
            if name == MANIFEST or os.path.islink(full):
                continue
            files[safe_member_name(name, root)] = {"sha256": sha256_of(fs, full), "bytes": os.path.getsize(full)}
    manifest = seal({**fields, "files": files})
    tmp = os.path.join(root, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(root, MANIFEST))
    return manifest

"""Small-file I/O on any pyarrow filesystem (local when `fs` is None), and atomic local writes; no torch import.

Shared by the Parquet formats, the artifact store and the checkpoints, and light enough for
CLIs that only read manifests and metrics.
"""

from __future__ import annotations

import json
import os
import posixpath
import resource
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

# Version of every on-disk format; part of every artifact key, so a layout change never
# reuses artifacts written in the old layout.
FORMAT_VERSION = 1


def fs_path(path: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is None:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    return filesystem, path


def write_bytes(fs: pafs.FileSystem | None, path: str, data: bytes) -> None:
    """Write a whole small file, creating its parent directory."""
    fs, path = fs_path(path, fs)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(fs: pafs.FileSystem | None, path: str) -> bytes:
    """Read a whole small file."""
    fs, path = fs_path(path, fs)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(fs: pafs.FileSystem | None, path: str, obj: Any) -> None:
    """Write `obj` as indented JSON with sorted keys (diff-friendly, stable)."""
    write_bytes(fs, path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(fs: pafs.FileSystem | None, path: str) -> Any:
    """Read a JSON file written by `write_json`."""
    return json.loads(read_bytes(fs, path))


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Any]:
    """Open a hidden temp sibling of `path` for binary writing; on success fsync and rename it.

    On any error the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; not every OS can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (one decimal); torch-free for the store."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)

"""Small-file I/O on any pyarrow filesystem (local when `fs` is None); no torch import.

Shared by the Parquet formats and the artifact store, and light enough for CLIs that only
read manifests and metrics.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

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

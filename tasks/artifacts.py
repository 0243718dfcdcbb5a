"""References to stage outputs in the artifact store, and the Prefect cache keyed on them.

Tasks pass `ArtifactRef`s (store URI, stage, key), never tensors: a ref is a few bytes to
ship through Ray and to persist as a Prefect result, and the key is the content address
of the stage output (ARCHITECTURE.md, sections 3-4). The Prefect cache key of a stage task is
the same store key (`tasks.store.store_cache_key_fn`), so a re-run of a flow with the same
parameters reuses finished stages.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pyarrow.fs import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from distill.manifest import IntegrityError, safe_member_name, verify_files
from tasks.store import Artifact, ArtifactStore, StoreError, cache_hit_level, cache_root


class ArtifactRef(BaseModel):
    """Where a stage output lives; resolvable from any process that can reach the store."""

    model_config = ConfigDict(frozen=True)

    store: str
    stage: str
    key: str

    @property
    def uri(self) -> str:
        return f"{self.store.rstrip('/')}/{self.stage}/{self.key}"

    def open(self, *, verify: bool = True) -> Artifact:
        return ArtifactStore(self.store).open(self.stage, self.key, verify=verify)

    def local_dir(self) -> Path:
        """A local directory holding the artifact's files (a verified copy for remote stores)."""
        art = self.open(verify=True)
        local = art.local_path()
        if local is not None:
            return Path(local)
        return _local_copy(art)


def _local_copy(art: Artifact) -> Path:
    """Copy a remote artifact into a per-user cache once; the manifest's hashes name the copy.

    The remote manifest is untrusted input: every file name is checked to stay inside the
    copy (`safe_member_name`, already applied when the manifest was read, and again here
    on the resolved path), files are created exclusively without following links, and each
    file's bytes are hashed as they are copied, so what lands in the cache is exactly what
    the manifest promised or nothing at all.
    """
    files = art.manifest["files"]
    where = f"artifact {art.stage}/{art.key} at {art.uri}"
    try:
        for name in files:
            safe_member_name(name, where)
    except IntegrityError as e:
        raise StoreError(str(e)) from e
    digest = hashlib.sha256(repr(sorted((n, e["sha256"]) for n, e in files.items())).encode()).hexdigest()[:16]
    dest = cache_root() / art.stage / f"{art.key}-{digest}"
    if dest.exists():
        try:
            verify_files(LocalFileSystem(), str(dest), art.manifest, str(dest), cache_hit_level())
            return dest
        except IntegrityError:  # a damaged cache copy is dropped and fetched again
            shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        root = os.path.realpath(tmp)
        for name, entry in files.items():
            target = tmp / name
            if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
                raise StoreError(f"{where}: file name {name!r} resolves outside the cache copy; refusing it")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            sha, size = hashlib.sha256(), 0
            with art.fs.open_input_stream(art.file(name)) as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 20):
                    sha.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            if (sha.hexdigest(), size) != (entry["sha256"], entry["bytes"]):
                raise StoreError(f"{where}/{name}: copied bytes do not match the manifest (changed while copying?)")
        os.rename(tmp, dest)
    except OSError:
        if not dest.exists():
            raise
        # another process finished the same copy first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

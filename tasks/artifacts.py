"""References to stage outputs in the artifact store, and the Prefect cache keyed on them.

Tasks pass `ArtifactRef`s (store URI, stage, key), never tensors: a ref is a few bytes to
ship through Ray and to persist as a Prefect result, and the key is the content address
of the stage output (ARCHITECTURE section 3). The Prefect cache key of a stage task is the
same store key (`tasks.store.store_cache_key_fn`), so a re-run of a flow with the same parameters reuses finished stages.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.store import Artifact, ArtifactStore


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
    """Copy a remote artifact into a per-user cache once; the manifest's hashes name the copy."""
    digest = hashlib.sha256(repr(sorted(art.manifest["files"].items())).encode()).hexdigest()[:16]
    root = Path(os.environ.get("DISTILLERY_CACHE", Path(tempfile.gettempdir()) / "distillery-cache"))
    dest = root / art.stage / f"{art.key}-{digest}"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    for name in art.manifest["files"]:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with art.fs.open_input_stream(art.file(name)) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

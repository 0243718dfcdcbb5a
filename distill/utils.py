"""Small helpers shared by the distill core: seeding, device resolution, peak memory, the progress type.

Devices follow timm's convention: code asks for "auto" and an environment variable
(`DISTILLERY_DEVICE`) can pin the choice for a whole process, e.g. a Ray worker that was
given no GPU, without threading a flag through every call.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from typing import Any, Callable

import numpy as np
import torch

from distill.fsio import peak_rss_mb  # noqa: F401  (re-exported: the core reads it from here)

# Long loops call progress(step, total, **metrics); the task layer turns the calls into
# Prefect progress artifacts and log lines, the core never imports prefect.
Progress = Callable[..., None]

DEVICE_ENV = "DISTILLERY_DEVICE"
_DEVICE_FORMS = '"auto", "cpu", "cuda" or "cuda:<index>"'
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) for code that uses the global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: Any, sep: str = "/") -> int:
    """A 63-bit seed from (seed, purpose, index, ...): independent streams, each reproducible alone.

    sha256 of the parts joined by `sep`, the first 8 bytes read little-endian, shifted right by
    one. Every derived stream of the core (experts, teacher, KRR-ST pools, per-class samples)
    comes from here, never from the clock.
    """
    digest = hashlib.sha256(sep.join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def tensor_digest(*tensors: torch.Tensor) -> str:
    """16 hex digits of sha256 over the tensors' shapes, dtypes and bytes: what a resumed loop's data must match."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(json.dumps([list(t.shape), str(t.dtype)]).encode())
        h.update(t.detach().cpu().contiguous().numpy().data)
    return h.hexdigest()[:16]


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated on `device` since its last reset_peak_memory_stats; otherwise the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak_rss_mb()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn "auto"/None/"cpu"/"cuda"/"cuda:N" into a torch.device.

    "auto" (or None) reads $DISTILLERY_DEVICE first, then picks CUDA when available.
    An explicit device is respected as given, so a caller can force CPU on a GPU box.
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        device = os.environ.get(DEVICE_ENV, "auto").strip() or "auto"
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        source = f"${DEVICE_ENV}={device!r}"
    else:
        source = repr(device)
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"invalid device {source}; valid forms: {_DEVICE_FORMS}")
    return torch.device(device)

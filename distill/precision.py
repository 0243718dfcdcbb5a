"""Numeric precision of the heavy loops (matching, evaluation, experts): fp32, tf32 or bf16.

    fp32  full float32 everywhere (the default; what every result so far used). On CUDA this
          turns TF32 off for matmuls and cuDNN convolutions inside the block: torch's own default
          runs cuDNN convolutions on TF32, which would make "fp32" a 10-bit-mantissa run there
    tf32  float32 tensors, CUDA matmuls and convolutions on TF32 tensor cores (10-bit mantissa
          products, float32 accumulation); on CPU the same as fp32
    bf16  autocast to bfloat16 (convolutions and matmuls in bf16, norms, losses and parameters
          in float32); on CPU too, where it is mainly a correctness path for GPU runs

`precision_context(name, device)` is the one place that turns a name into settings; it
changes no global state outside its block (the TF32 flags are restored on exit). The flags are
set with torch's `fp32_precision` API where it exists (torch >= 2.9): once anything has used
that API, reading the legacy `allow_tf32` flags raises, so the two are never mixed here. Parameters,
optimizer state and the matching's flat parameter vectors stay float32 in every mode.

    with precision_context("bf16", device):
        loss = loss_fn(net(x), y)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    return name


# torch >= 2.9 sets TF32 per backend with `fp32_precision` strings; before, with `allow_tf32` flags
_NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def _flags() -> tuple[str, str]:
    """(matmul, cuDNN conv) float32 modes exactly as set: 'ieee', 'tf32' or, new API only, 'none'."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if _NEW_TF32_API:
        return matmul.fp32_precision, cudnn.conv.fp32_precision
    return ("tf32" if matmul.allow_tf32 else "ieee"), ("tf32" if cudnn.allow_tf32 else "ieee")


def _write_flags(matmul: str, conv: str) -> None:
    if _NEW_TF32_API:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
        torch.backends.cudnn.allow_tf32 = conv == "tf32"


def cuda_fp32_precision() -> tuple[str, str]:
    """(matmul, cuDNN conv) float32 modes on CUDA: 'ieee' (true float32) or 'tf32'; torch's
    'none' (no choice made) is read as what it means by default (matmuls ieee, cuDNN conv tf32)."""
    m, c = _flags()
    if "none" in (m, c):
        # an unset level inherits the generic one, and an unset generic one means torch's default
        generic = torch.backends.fp32_precision
        m = m if m != "none" else (generic if generic != "none" else "ieee")
        c = c if c != "none" else (generic if generic != "none" else "tf32")
    return m, c


def set_cuda_fp32_precision(matmul: str, conv: str) -> None:
    """Set the float32 mode of CUDA matmuls and cuDNN convolutions: 'ieee' or 'tf32' each."""
    for mode in (matmul, conv):
        if mode not in ("ieee", "tf32"):
            raise ValueError(f"unknown float32 mode {mode!r}; valid: ieee, tf32")
    _write_flags(matmul, conv)


@contextlib.contextmanager
def precision_context(name: str, device: str | torch.device) -> Iterator[None]:
    """Run the block at precision `name` on `device` (see the module docstring)."""
    check_precision(name)
    device_type = torch.device(device).type
    if name == "bf16":
        # no cast cache: the block may span optimizer steps, and a cached bf16 copy of a weight
        # would keep its value from before them
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=False):
            yield
        return
    if device_type != "cuda":  # the TF32 flags only steer CUDA kernels
        yield
        return
    saved = _flags()  # as set, so an unset 'none' is restored as 'none'
    mode = "tf32" if name == "tf32" else "ieee"
    set_cuda_fp32_precision(mode, mode)
    try:
        yield
    finally:
        _write_flags(*saved)


class PrecisionField(BaseModel):
    """Config mixin: a `precision` field (PRECISIONS), left out of the config's JSON at "fp32", so
    cache keys and checkpoint identities of configs from before the field existed do not change."""

    precision: Precision = Field(
        "fp32",
        description=(
            "Numeric precision of the training loop: fp32, tf32 (CUDA TF32 convolutions/matmuls; on CPU "
            "the same as fp32) or bf16 autocast (parameters and optimizer state stay float32)."
        ),
    )

    @model_serializer(mode="wrap")
    def _omit_default_precision(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("precision") == "fp32":
            del data["precision"]
        return data

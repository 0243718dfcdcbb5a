"""Numeric precision of the heavy loops (matching, evaluation, experts): fp32, tf32 or bf16.

    fp32  full float32 everywhere (the default; what every result so far used)
    tf32  float32 tensors, CUDA matmuls and convolutions on TF32 tensor cores (10-bit mantissa
          products, float32 accumulation); on CPU the same as fp32
    bf16  autocast to bfloat16 (convolutions and matmuls in bf16, norms, losses and parameters
          in float32); on CPU too, where it is mainly a correctness path for GPU runs

`precision_context(name, device)` is the one place that turns a name into settings; it
changes no global state outside its block (the TF32 flags are restored on exit). Parameters,
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


@contextlib.contextmanager
def precision_context(name: str, device: str | torch.device) -> Iterator[None]:
    """Run the block at precision `name` on `device` (see the module docstring)."""
    check_precision(name)
    device_type = torch.device(device).type
    if name == "fp32":
        yield
    elif name == "tf32":
        if device_type != "cuda":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        # no cast cache: the block may span optimizer steps, and a cached bf16 copy of a weight
        # would keep its value from before them
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, cache_enabled=False):
            yield


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

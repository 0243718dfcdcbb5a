"""2x2 average pooling (stride 2) from strided adds: 3-4x faster than avg_pool2d on CPU, any order of derivative.

PyTorch's CPU avg_pool2d (and its backward) on contiguous NCHW maps is a scalar loop: on the
matching student's maps it costs ~5x an elementwise multiply of the same input, and trajectory
matching runs it three times per layer and inner step (forward, first backward, and again in
the second backward). Here the forward is two vectorized adds of halves (rows, then columns)
and the backward a broadcast copy; each is an `autograd.Function` whose backward is the other
(both are linear), so derivatives of any order stay on the fast path.

`AvgPool2(2, 2)` is a drop-in for `nn.AvgPool2d(2, 2)`: same output (to rounding: the four
values are summed pairwise) for maps of even height and width; odd sizes fall back to avg_pool2d.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _pool(x: torch.Tensor) -> torch.Tensor:
    *lead, h, w = x.shape
    rows = x.contiguous().view(*lead, h // 2, 2, w)
    s = rows.select(-2, 0) + rows.select(-2, 1)  # [..., h/2, w]
    cols = s.view(*lead, h // 2, w // 2, 2)
    return (cols.select(-1, 0) + cols.select(-1, 1)).mul_(0.25)


def _unpool(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of _pool: each gradient value / 4 to the four inputs it averaged."""
    *lead, h2, w2 = g.shape
    q = (g * 0.25).unsqueeze(-1).expand(*lead, h2, w2, 2).reshape(*lead, h2, 1, 2 * w2)
    return q.expand(*lead, h2, 2, 2 * w2).reshape(*lead, 2 * h2, 2 * w2)


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _pool(x)

    @staticmethod
    def backward(ctx, g):
        return _Unpool.apply(g)


class _Unpool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g):
        return _unpool(g)

    @staticmethod
    def backward(ctx, gg):
        return _Pool.apply(gg)


def avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2) for [N, C, H, W] maps; the strided-add path when H and W are even."""
    if x.dim() != 4:
        raise ValueError(f"avg_pool2 needs [N, C, H, W] maps; got shape {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.avg_pool2d(x, 2)
    return _Pool.apply(x)


class AvgPool2(nn.Module):
    """Drop-in for nn.AvgPool2d(2, 2) with fast forward and backward on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool2(x)

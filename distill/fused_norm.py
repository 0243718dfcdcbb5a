"""Instance norm (GroupNorm with one group per channel) with a closed-form double backward.

Trajectory matching differentiates through the student's inner SGD steps, so every inner
step's gradient is computed with `create_graph=True` and later differentiated again. For
`nn.GroupNorm` PyTorch then swaps its fused backward kernel for a composite one built from
dozens of elementwise ops, each saved in the graph and differentiated again. Here the
backward is itself an `autograd.Function` whose own backward is written out by hand, so:

    forward          one native group-norm kernel (saves x, per-slice mean and rstd)
    first backward   one native group-norm backward kernel (recorded as one graph node)
    second backward  two native group-norm backward kernels and a few per-slice reductions

Math, per (sample, channel) slice of M = H*W values, xhat = (x - mean) * r, r = 1/sqrt(var + eps),
y = gamma * xhat + beta. With P(v) = v - mean(v) - xhat * mean(v * xhat) (self-adjoint), the
first backward from gy is dx = r P(gamma gy), dgamma = sum gy xhat, dbeta = sum gy. Given the
gradients a, b, e flowing into (dx, dgamma, dbeta), the second backward is

    q        = r P(a)                                       (the native backward of a, gamma = 1)
    d gy     = gamma q + b xhat + e
    d gamma  = sum gy q
    d x      = r P(G) - G_r r^2 / M xhat,   G = b gy - r (gamma mean(gy xhat) a + mean(a xhat) gamma gy),
                                            G_r = sum a r P(gamma gy) / r

using d xhat = r P(dx) and d r = -r^2 mean(xhat dx). Derivatives of third order are not
provided (matching never needs them): a backward with create_graph through the second one raises.

`InstanceNorm(C)` is a drop-in for `nn.GroupNorm(C, C)`: same `weight`/`bias` parameter names
and shapes and the same eps, so expert trajectories are interchangeable between the two.

    .venv/bin/python -m pytest tests/distill/test_fused_norm.py -q
"""

from __future__ import annotations

import torch
import torch.nn as nn

_EPS = 1e-5  # nn.GroupNorm's default


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] -> [N, C, M] view (reductions per slice along the last dim)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def _native_backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    mask: tuple[bool, bool, bool],
):
    n, c = x.shape[0], x.shape[1]
    return torch.ops.aten.native_group_norm_backward(
        gy.contiguous(), x, mean, rstd, weight, n, c, x[0, 0].numel(), c, list(mask)
    )


class _InstanceNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = x.contiguous()
        n, c = x.shape[0], x.shape[1]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = _InstanceNormBackwardFn.apply(gy, x, weight, mean, rstd, (need[0], need[1], need[2]))
        return dx, dw, db, None


def _slice_sums(v: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """Per (sample, channel) slice: (sum v * (x - mean) * rstd, sum v), each [N, C].

    The native backward's weight/bias gradients are exactly these sums per channel; viewing the
    batch as one sample of N*C channels makes them per slice, in one pass and without temporaries.
    """
    n, c = x.shape[0], x.shape[1]
    _, s_vx, s_v = torch.ops.aten.native_group_norm_backward(
        v.contiguous().view(1, n * c, -1),
        x.view(1, n * c, -1),
        mean.reshape(1, n * c),
        rstd.reshape(1, n * c),
        None,
        1,
        n * c,
        x[0, 0].numel(),
        n * c,
        [False, True, True],
    )
    return s_vx.view(n, c, 1), s_v.view(n, c, 1)


def _slice_dot(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel) slice: sum v * w, [N, C, 1] (the same kernel with mean 0, rstd 1)."""
    n, c = w.shape[0], w.shape[1]
    flat = torch.zeros(1, n * c, dtype=w.dtype, device=w.device)
    _, s, _ = torch.ops.aten.native_group_norm_backward(
        v.contiguous().view(1, n * c, -1),
        w.contiguous().view(1, n * c, -1),
        flat,
        flat + 1,
        None,
        1,
        n * c,
        w[0, 0].numel(),
        n * c,
        [False, True, False],
    )
    return s.view(n, c, 1)


class _InstanceNormBackwardFn(torch.autograd.Function):
    """(gy, x, weight) -> (dx, dweight, dbias) of instance norm; mean/rstd are x's cached statistics."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, rstd, mask):
        ctx.save_for_backward(gy, x, weight, mean, rstd)
        ctx.set_materialize_grads(False)
        return _native_backward(gy, x, mean, rstd, weight, mask)

    @staticmethod
    def backward(ctx, a, b, e):
        gy, x, weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, e, gy, x, weight)):
            # once_differentiable would only fail when the error node lies on the path to the
            # requested inputs; a silently partial third derivative is worse than this error.
            raise RuntimeError(
                "third derivatives of the fused instance norm are not implemented; "
                "use norm='instance' (nn.GroupNorm) for them"
            )
        with torch.no_grad():
            return _InstanceNormBackwardFn._second_backward(ctx, gy, x, weight, mean, rstd, a, b, e)

    @staticmethod
    def _second_backward(ctx, gy, x, weight, mean, rstd, a, b, e):
        # Every output is a per-slice linear combination of a, gy, x and 1: five per-slice sums
        # (three kernel calls), then each output is written in two or three fused passes.
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        if a is None and b is None and e is None:
            return None, None, None, None, None, None
        n, c = x.shape[0], x.shape[1]
        m = x[0, 0].numel()
        r, mu = rstd.view(n, c, 1), mean.view(n, c, 1)
        gr = weight.view(1, c, 1) * r
        zero = torch.zeros_like(r)
        gy3, x3 = _flat(gy), _flat(x)
        mean_gx, mean_g = (s / m for s in _slice_sums(gy, x, mean, rstd))  # mean(gy xhat), mean(gy)
        if a is not None:
            a3 = _flat(a)
            mean_ax, mean_a = (s / m for s in _slice_sums(a, x, mean, rstd))  # mean(a xhat), mean(a)
        else:
            mean_ax = mean_a = zero
        b_ = b.view(1, c, 1) if b is not None else zero
        e_ = e.view(1, c, 1) if e is not None else zero
        k = b_ - gr * mean_ax  # coefficient of xhat in d gy and of gy in G = d objective / d xhat
        # mean(gy P(a)) = mean(a gy) - mean(a) mean(gy) - mean(a xhat) mean(gy xhat)
        cov = _slice_dot(a, gy) / m - mean_a * mean_g - mean_ax * mean_gx if a is not None else None
        d_gy = d_x = d_w = None
        if need_w and a is not None:
            d_w = (r * cov).sum((0, 2)) * m
        if need_gy:
            # gamma r a + k xhat + (e - gamma r mean(a)), with xhat = r x - r mean
            d_gy = torch.addcmul(e_ - gr * mean_a - k * r * mu, x3, k * r)
            if a is not None:
                d_gy = d_gy.addcmul_(a3, gr)
            d_gy = d_gy.view(gy.shape)
        if need_x:
            # G = g1 a + k gy; d x = r P(G) - G_r r^2 / M xhat = r g1 a + r k gy - h xhat - r mean(G)
            g1 = -gr * mean_gx
            h = r * (g1 * mean_ax + k * mean_gx)
            if cov is not None:
                h = h + r * gr * cov
            mean_big_g = g1 * mean_a + k * mean_g
            d_x = torch.addcmul(h * r * mu - r * mean_big_g, x3, -h * r).addcmul_(gy3, r * k)
            if a is not None:
                d_x = d_x.addcmul_(a3, r * g1)
            d_x = d_x.view(x.shape)
        return d_gy, d_x, d_w, None, None, None


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """F.group_norm(x, C, weight, bias, eps) with a closed-form double backward."""
    if x.dim() < 3:
        raise ValueError(f"instance norm needs [N, C, *spatial] input; got shape {tuple(x.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        # statistics in float32 under autocast (bf16 means and variances lose too much); the next
        # convolution casts the output back down
        with torch.autocast(x.device.type, enabled=False):
            return _InstanceNormFn.apply(x.float(), weight.float(), bias.float(), eps)
    return _InstanceNormFn.apply(x, weight, bias, eps)


class InstanceNorm(nn.Module):
    """Drop-in for nn.GroupNorm(C, C) (affine, eps 1e-5) whose double backward is a few fused ops."""

    def __init__(self, num_channels: int, eps: float = _EPS):
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"

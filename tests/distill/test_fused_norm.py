"""The fused instance norm (distill.fused_norm): exact first and second derivatives, and a drop-in
for nn.GroupNorm(C, C) in nets and in trajectory matching (float64, to 1e-9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from distill.augment import DSAConfig, sample_params
from distill.fused_norm import InstanceNorm, instance_norm
from distill.matching import Segment, Student, matching_grad
from distill.nets import create_net, flatten_params, param_layout
from distill.trajectory import net_meta


def _inputs(shape=(3, 4, 5, 5), seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) + offset).requires_grad_()
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 3, 7), (1, 2, 3, 2, 2)])
def test_gradcheck_and_gradgradcheck(shape):
    args = _inputs(shape)
    assert gradcheck(instance_norm, args)
    assert gradgradcheck(instance_norm, args)


def test_gradgradcheck_with_a_large_mean_and_partial_inputs():
    x, w, b = _inputs((2, 3, 3, 4), offset=30.0)
    assert gradgradcheck(instance_norm, (x, w, b))
    # only some inputs need gradients: the hand-written backward must skip the others
    assert gradgradcheck(lambda x: instance_norm(x, w.detach(), b.detach()), (x,))
    assert gradgradcheck(lambda w: instance_norm(x.detach(), w, b.detach()), (w,))


def test_second_derivatives_equal_the_composite_ones_when_only_some_outputs_are_used():
    """Double backward where dgamma or dx is not used (grad_outputs None inside the Function)."""
    weights = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for use in ("x", "w", "b", "all"):
        grads = []
        for fn in (instance_norm, lambda x, w, b: F.group_norm(x, x.shape[1], w, b)):
            x, w, b = _inputs(seed=3)
            y = fn(x, w, b)
            gx, gw, gb = torch.autograd.grad((y.tanh() * weights).sum(), (x, w, b), create_graph=True)
            obj = {
                "x": gx.pow(2).sum(),
                "w": gw.pow(3).sum(),
                "b": gb.sin().sum(),
                "all": gx.pow(2).sum() + gw.pow(3).sum() + gb.sin().sum(),
            }[use]
            grads.append(torch.autograd.grad(obj, (x, w, b), allow_unused=True, materialize_grads=True))
        for fused, native in zip(*grads):
            assert torch.isfinite(native).all()
            torch.testing.assert_close(fused, native, rtol=1e-9, atol=1e-9)


def test_module_matches_groupnorm_and_keeps_its_parameter_names():
    native, fused = nn.GroupNorm(6, 6), InstanceNorm(6)
    assert [(n, p.shape) for n, p in native.named_parameters()] == [(n, p.shape) for n, p in fused.named_parameters()]
    fused.load_state_dict(native.state_dict())
    x = torch.randn(4, 6, 8, 8)
    torch.testing.assert_close(fused(x), native(x))


def test_fused_net_has_the_instance_net_layout_and_outputs():
    a = create_net("convnet", num_classes=10, width=8, depth=2, norm="instance")
    b = create_net("convnet", num_classes=10, width=8, depth=2, norm="instance_fused")
    assert param_layout(a) == param_layout(b)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(b(x), a(x))


def _student(norm: str, width: int = 6, depth: int = 2, size: int = 16) -> tuple[Student, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = {"width": width, "depth": depth, "norm": norm}
    net = create_net("convnet", num_classes=4, image_size=size, **kwargs)
    meta = net_meta(net, "convnet", kwargs, num_classes=4, image_size=size)
    return Student(meta, torch.device("cpu"), torch.float64, fast=False), flatten_params(net).double()


@pytest.mark.parametrize("mode", ["unrolled", "constant"])
def test_matching_gradient_through_unrolled_steps_equals_groupnorm_in_float64(mode):
    (native, start), (fused, start_fused) = _student("instance"), _student("instance_fused")
    assert torch.equal(start, start_fused)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(2)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    plan = [(torch.randperm(8, generator=g)[:6], sample_params(6, DSAConfig(), g)) for _ in range(4)]
    seg = Segment(start, [(2, start + 0.02, 0.5), (4, target, 1.0)], plan, momentum=0.5)
    lr = torch.tensor(0.05, dtype=torch.float64)
    want = matching_grad(mode, native, images, labels, lr, seg)
    got = matching_grad(mode, fused, images, labels, lr, seg)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * max(1.0, float(b.abs().max())))
    assert float(got[1].abs().max()) > 0


def test_float32_error_is_no_worse_than_groupnorm():
    """Against the float64 values, the fused norm's float32 rounding error (forward, first and second
    derivatives) stays within 2x GroupNorm's own float32 error."""

    def derivatives(fn, dtype):
        x, w, b = (t.detach().to(dtype).requires_grad_() for t in _inputs((8, 16, 12, 12), offset=2.0))
        y = fn(x, w, b)
        gx, gw, gb = torch.autograd.grad(y.sin().sum(), (x, w, b), create_graph=True)
        return [y, gx, gw, *torch.autograd.grad(gx.pow(2).sum() + gw.sum() + gb.pow(2).sum(), (x, w, b))]

    native = lambda x, w, b: F.group_norm(x, 16, w, b)  # noqa: E731
    exact = derivatives(native, torch.float64)
    for want, fused, ref in zip(exact, derivatives(instance_norm, torch.float32), derivatives(native, torch.float32)):
        err_fused = float((fused.double() - want).abs().max())
        err_native = float((ref.double() - want).abs().max())
        assert err_fused <= 2 * err_native + 1e-6 * float(want.abs().max())


def test_third_derivative_is_refused():
    x, w, b = _inputs()
    (gx,) = torch.autograd.grad(instance_norm(x, w, b).sin().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)
    torch.autograd.grad(gx.pow(2).sum(), x)  # without create_graph: fine


def test_bad_input_rank_is_refused():
    with pytest.raises(ValueError, match="instance norm needs"):
        instance_norm(torch.randn(4, 3), torch.ones(3), torch.zeros(3))


# ---------------------------------------------------------------- fast avg pooling and the fast student


def test_fast_avg_pool_equals_avg_pool2d_in_every_derivative_order():
    from distill.fast_pool import AvgPool2, avg_pool2

    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(avg_pool2, (x,))
    assert gradgradcheck(avg_pool2, (x,))
    torch.testing.assert_close(avg_pool2(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-15)
    g = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    (mine,) = torch.autograd.grad(avg_pool2(x), x, g)
    (ref,) = torch.autograd.grad(F.avg_pool2d(x, 2), x, g)
    assert torch.equal(mine, ref)
    odd = torch.randn(2, 3, 7, 5)  # odd sizes: avg_pool2d's flooring
    assert torch.equal(AvgPool2()(odd), nn.AvgPool2d(2, 2)(odd))
    with pytest.raises(ValueError, match="avg_pool2 needs"):
        avg_pool2(torch.randn(3, 4, 4))


def test_fast_net_kwargs_swaps_defaults_and_explicit_layers_only():
    from distill.nets import fast_net_kwargs

    assert fast_net_kwargs("convnet", {"width": 8}) == {"width": 8, "norm": "instance_fused", "pooling": "avg_fast"}
    assert fast_net_kwargs("convnet", {"norm": "batch", "pooling": "max"}) == {"norm": "batch", "pooling": "max"}
    assert fast_net_kwargs("convnet_bn", {}) == {"pooling": "avg_fast"}
    assert fast_net_kwargs("resnet18", {"norm": "batch"}) == {"norm": "batch"}
    with pytest.raises(ValueError, match="unknown net"):
        fast_net_kwargs("vgg", {})


def test_fast_student_gives_the_native_matching_gradient_in_float64():
    native, start = _student("instance")
    fast = Student(native_meta(), torch.device("cpu"), torch.float64)  # fast=True by default
    assert any(isinstance(m, InstanceNorm) for m in fast.net.modules())
    g = torch.Generator().manual_seed(2)
    images = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(2)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    plan = [(torch.randperm(8, generator=g)[:6], sample_params(6, DSAConfig(), g)) for _ in range(3)]
    seg = Segment(start, [(3, target, 1.0)], plan)
    lr = torch.tensor(0.05, dtype=torch.float64)
    want = matching_grad("unrolled", native, images, labels, lr, seg)
    got = matching_grad("unrolled", fast, images, labels, lr, seg)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * max(1.0, float(b.abs().max())))


def native_meta() -> dict:
    kwargs = {"width": 6, "depth": 2, "norm": "instance"}
    net = create_net("convnet", num_classes=4, image_size=16, **kwargs)
    return net_meta(net, "convnet", kwargs, num_classes=4, image_size=16)

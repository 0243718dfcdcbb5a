"""Tests for distill.nets: every registered net (and every ConvNet norm) under one contract."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from distill.nets import (
    NETS,
    NORMS,
    create_net,
    flatten_params,
    list_nets,
    param_layout,
    register_net,
    unflatten_params,
)

CASES = [(name, {}) for name in list_nets()] + [("convnet", {"norm": norm, "width": 16}) for norm in NORMS]
IDS = [name + "".join(f"-{v}" for k, v in kw.items() if k == "norm") for name, kw in CASES]


def _build(name: str, kwargs: dict, num_classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return create_net(name, num_classes=num_classes, **kwargs)


def _batch(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_shapes_finite_and_head(name, kwargs):
    net = _build(name, kwargs)
    x = _batch()
    out = net(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    feats = net.embed(x)
    assert feats.shape == (3, net.feature_dim)
    assert isinstance(net.classifier, nn.Linear) and net.classifier.in_features == net.feature_dim
    net.eval()  # batch-norm nets give batch-dependent outputs in train mode
    torch.testing.assert_close(net(x), net.classifier(net.embed(x)))


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_every_parameter_gets_a_gradient(name, kwargs):
    net = _build(name, kwargs)
    F.cross_entropy(net(_batch()), torch.tensor([0, 3, 6])).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_functional_call_and_double_backward(name, kwargs):
    net = _build(name, kwargs)
    x = _batch().requires_grad_()
    flat = flatten_params(net).requires_grad_()
    params = unflatten_params(flat, param_layout(net))
    out = functional_call(net, params, (x,))
    torch.testing.assert_close(out, net(x))
    # Trajectory matching: an inner SGD step with create_graph, then backward to the input.
    (grad,) = torch.autograd.grad(F.cross_entropy(out, torch.tensor([0, 3, 6])), flat, create_graph=True)
    (grad.square().sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_instance_norm_is_per_sample_per_channel():
    norm = NORMS["instance"](4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 4, 5, 6) * 3 + 1
    mean = x.mean((2, 3), keepdim=True)
    var = x.var((2, 3), keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected)


def test_mtt_sizes():
    # 28x28 single-channel input is padded to 32 px in the first conv, as in MTT.
    mnist = create_net("convnet", num_classes=10, channels=1, image_size=28)
    cifar = create_net("convnet", num_classes=10)
    assert mnist.feature_dim == cifar.feature_dim == 128 * 4 * 4
    assert mnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert create_net("convnet_d4", num_classes=200, image_size=64).feature_dim == 128 * 4 * 4
    assert create_net("convnet_d5", num_classes=10, image_size=128).feature_dim == 128 * 4 * 4
    krr = create_net("convnet_bn", num_classes=512, widths=(128, 256, 512))
    assert krr.feature_dim == 512 * 4 * 4 and krr(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert create_net("resnet18", num_classes=512, image_size=64).feature_dim == 512


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="unknown net 'vgg'; valid: convnet, convnet_d4, convnet_d5, convnet_bn"):
        create_net("vgg", num_classes=10)
    with pytest.raises(ValueError, match="unknown argument.*wdith.*valid: width, depth, norm, act, pooling"):
        create_net("convnet", num_classes=10, wdith=32)
    with pytest.raises(ValueError, match="unknown norm 'instancenorm'; valid: instance, .*batch, layer, group, none"):
        create_net("convnet", num_classes=10, norm="instancenorm")
    with pytest.raises(ValueError, match="unknown norm"):
        create_net("resnet18", num_classes=10, norm="bn")
    with pytest.raises(ValueError, match="unknown act 'tanh'"):
        create_net("convnet", num_classes=10, act="tanh")
    with pytest.raises(ValueError, match="too small"):
        create_net("convnet_d5", num_classes=10, image_size=16)


def test_register_net_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_net("convnet")(lambda **kw: nn.Identity())
    assert set(list_nets()) == set(NETS)


def test_param_layout_round_trip():
    net = _build("convnet", {"width": 8, "depth": 2})
    layout = param_layout(net)
    assert [n for n, _ in layout] == [n for n, _ in net.named_parameters()]
    flat = flatten_params(net)
    assert flat.dtype == torch.float32 and flat.shape == (sum(p.numel() for p in net.parameters()),)
    params = unflatten_params(flat, layout)
    for name, p in net.named_parameters():
        assert torch.equal(params[name], p.detach())
    other = _build("convnet", {"width": 8, "depth": 2})
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(params, strict=False)
    assert torch.equal(flatten_params(other), flat)
    with pytest.raises(ValueError, match="layout needs"):
        unflatten_params(flat[:-1], layout)

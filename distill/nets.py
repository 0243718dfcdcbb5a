"""Network registry and the networks of the papers: MTT's ConvNet, KRR-ST's BN ConvNet, CIFAR ResNet-18.

timm-style: `@register_net(name)` adds a builder to NETS, `create_net(name, num_classes=...)`
builds one and refuses unknown names and arguments with the valid choices. Every net has the
same surface, so probing, fine-tuning and KRR code never special-case an architecture:

    net.embed(x)     -> [N, net.feature_dim]   penultimate features
    net.classifier   -> nn.Linear(feature_dim, num_classes)
    net(x)           == net.classifier(net.embed(x))

Nets have no in-place activations and no python-side state, so trajectory matching can run
them with `torch.func.functional_call(net, params, x)` and differentiate twice.
Expert trajectories store parameters flattened in `param_layout(net)` order.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn as nn

NETS: dict[str, Callable[..., nn.Module]] = {}

# Arguments every builder receives from create_net; everything else is net-specific.
_COMMON_ARGS = ("num_classes", "channels", "image_size")


def register_net(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder `fn(*, num_classes, channels, image_size, **options)` to NETS."""

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in NETS:
            raise ValueError(f"net {name!r} is already registered")
        NETS[name] = builder
        return builder

    return add


def list_nets() -> list[str]:
    return sorted(NETS)


def net_arg_problem(name: str, kwargs: dict[str, Any]) -> str | None:
    """Why `create_net(name, **kwargs)` would be refused (unknown net or argument), or None.

    Configs call this at validation time, so a bad net is refused before any data is loaded.
    """
    if name not in NETS:
        return f"unknown net {name!r}; registered nets: {', '.join(list_nets())}"
    options = [p for p in inspect.signature(NETS[name]).parameters if p not in _COMMON_ARGS]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        return f"net {name!r} got unknown argument(s) {', '.join(unknown)}; valid: {', '.join(options)}"
    return None


def create_net(name: str, *, num_classes: int, channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Build a registered net; `num_classes` is any output dim (KRR-ST regresses 512-d targets)."""
    problem = net_arg_problem(name, kwargs)
    if problem:
        raise (ValueError if name not in NETS else TypeError)(problem)
    return NETS[name](num_classes=num_classes, channels=channels, image_size=image_size, **kwargs)


def _choose(kind: str, name: str, table: dict[str, Callable]) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(table)}")
    return table[name]


# Norm layers, by name -> factory(num_channels).
# "instance" is MTT's instance norm: per-sample, per-channel statistics with a per-channel affine,
# i.e. GroupNorm with one group per channel (MTT writes it as nn.GroupNorm(C, C)). The methods
# brief (2.8) measured a hand-written mean/var version ~2x faster under double backward; re-measured
# with torch 2.14 on the 2-core CPU, interleaved runs, the native kernel wins both ways (w32 d3
# 3x32x32, 100 images, 20 unrolled steps + backward: 2.3-4.0 s native vs 3.1-5.3 s hand-written;
# plain training at batch 256: 64-76 ms vs 98 ms per step), so the native kernel is used.
# "layer" normalizes over (C, H, W) with a per-channel affine, so its parameter count does not
# depend on the resolution (MTT's nn.LayerNorm([C, H, W]) has a per-pixel affine).
# "group" uses 32 groups (Wu & He), or fewer when the width is not a multiple of 32.
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "instance": lambda c: nn.GroupNorm(c, c),
    "batch": nn.BatchNorm2d,
    "layer": lambda c: nn.GroupNorm(1, c),
    "group": lambda c: nn.GroupNorm(math.gcd(32, c), c),
    "none": lambda c: nn.Identity(),
}

# Never in-place: an in-place activation can overwrite a tensor the double backward needs.
ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}

POOLS: dict[str, Callable[[], nn.Module]] = {
    "avg": lambda: nn.AvgPool2d(2, 2),
    "max": lambda: nn.MaxPool2d(2, 2),
    "none": nn.Identity,
}


class ConvNet(nn.Module):
    """[conv3x3 -> norm -> act -> pool2] per width, then a linear head on the flattened map (MTT/DC)."""

    def __init__(
        self,
        num_classes: int,
        channels: int = 3,
        image_size: int = 32,
        widths: tuple[int, ...] = (128, 128, 128),
        norm: str = "instance",
        act: str = "relu",
        pooling: str = "avg",
    ):
        super().__init__()
        make_norm = _choose("norm", norm, NORMS)
        make_act = _choose("act", act, ACTS)
        make_pool = _choose("pooling", pooling, POOLS)
        if not widths:
            raise ValueError("ConvNet needs at least one block (depth >= 1)")
        layers: list[nn.Module] = []
        size, c_in = image_size, channels
        for i, width in enumerate(widths):
            # MTT pads 28x28 inputs (MNIST-like) by 3 in the first conv so the map is 32x32 and
            # every later size matches the 32 px nets.
            pad = 3 if i == 0 and image_size == 28 else 1
            # A bias before a norm is cancelled by its mean subtraction (exactly for instance and
            # batch norm) and would only be a parameter without gradient; MTT keeps it (+width each).
            layers += [nn.Conv2d(c_in, width, 3, padding=pad, bias=norm == "none"), make_norm(width), make_act()]
            size += 2 * pad - 2
            if pooling != "none":
                layers.append(make_pool())
                size //= 2
            c_in = width
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(widths)} pooled blocks")
        self.features = nn.Sequential(*layers)
        self.feature_dim = c_in * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@register_net("convnet")
def convnet(
    *,
    num_classes: int,
    channels: int = 3,
    image_size: int = 32,
    width: int = 128,
    depth: int = 3,
    norm: str = "instance",
    act: str = "relu",
    pooling: str = "avg",
) -> ConvNet:
    """MTT's ConvNet: width 128, depth 3 for 32 px (use depth 4 for 64 px, 5 for 128 px)."""
    return ConvNet(num_classes, channels, image_size, (width,) * depth, norm, act, pooling)


def _convnet_of_depth(depth: int) -> Callable[..., ConvNet]:
    def build(
        *,
        num_classes: int,
        channels: int = 3,
        image_size: int = 32,
        width: int = 128,
        norm: str = "instance",
        act: str = "relu",
        pooling: str = "avg",
    ) -> ConvNet:
        return ConvNet(num_classes, channels, image_size, (width,) * depth, norm, act, pooling)

    build.__doc__ = f"MTT's ConvNetD{depth}."
    return build


register_net("convnet_d4")(_convnet_of_depth(4))
register_net("convnet_d5")(_convnet_of_depth(5))


@register_net("convnet_bn")
def convnet_bn(
    *,
    num_classes: int,
    channels: int = 3,
    image_size: int = 32,
    widths: tuple[int, ...] = (32, 64, 128),
    norm: str = "batch",
    act: str = "relu",
    pooling: str = "avg",
) -> ConvNet:
    """KRR-ST's ConvNet: per-block widths with BatchNorm.

    The paper uses (128, 256, 512) at 32 px and (64, 128, 256, 512) at 64 px; the default is a
    CPU-sized 32-64-128 (brief 3.6).
    """
    return ConvNet(num_classes, channels, image_size, tuple(widths), norm, act, pooling)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: torchvision's, with a 3x3 stride-1 stem and no max-pool; 512-d features."""

    def __init__(self, num_classes: int, channels: int = 3, norm: str = "batch"):
        super().__init__()
        import torchvision  # deferred: importing it costs ~1.4 s in every process that only needs ConvNets

        body = torchvision.models.resnet18(norm_layer=_choose("norm", norm, NORMS))
        body.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        body.maxpool = nn.Identity()
        body.fc = nn.Identity()
        for m in body.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.backbone = body
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


@register_net("resnet18")
def resnet18(*, num_classes: int, channels: int = 3, image_size: int = 32, norm: str = "batch") -> ResNet18:
    """CIFAR ResNet-18 (KRR-ST's teacher architecture); any image_size works (global pooling)."""
    return ResNet18(num_classes, channels, norm)


def param_layout(net: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in named_parameters() order: the flat-vector layout."""
    return [(name, tuple(p.shape)) for name, p in net.named_parameters()]


def flatten_params(net: nn.Module) -> torch.Tensor:
    """All parameters as one detached float32 vector in param_layout order (a trajectory snapshot)."""
    return torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])


def unflatten_params(flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Views of `flat` shaped by `layout`, ready for functional_call; gradients flow back to `flat`."""
    sizes = [math.prod(shape) for _, shape in layout]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}; layout needs ({sum(sizes)},)")
    chunks = torch.split(flat, sizes)
    return {name: chunk.view(shape) for (name, shape), chunk in zip(layout, chunks)}

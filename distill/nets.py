"""Network registry and the networks of the papers: MTT's ConvNet, KRR-ST's BN ConvNet, CIFAR ResNet-18.

timm-style: `@register_net(name)` adds a builder to NETS, `create_net(name, num_classes=...)`
builds one and refuses unknown names and arguments with the valid choices. A builder's
keyword arguments carry their types and ranges (width >= 1, depth >= 1, a registered norm...),
so `NetSpec` and the configs that name a net (`NetFields`: `net` + `net_kwargs`) refuse a
bad setting when the config is built, before any data is loaded or any worker started.
Every net has the same surface, so probing, fine-tuning and KRR code never special-case an
architecture:

    net.embed(x)     -> [N, net.feature_dim]   penultimate features
    net.classifier   -> nn.Linear(feature_dim, num_classes)
    net(x)           == net.classifier(net.embed(x))

Nets have no in-place activations and no python-side state, so trajectory matching can run
them with `torch.func.functional_call(net, params, x)` and differentiate twice.
Expert trajectories store parameters flattened in `param_layout(net)` order.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from typing import Annotated, Any, Callable

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from distill.fast_pool import AvgPool2
from distill.fused_norm import InstanceNorm
from distill.registry import Registry

NETS: Registry[Callable[..., nn.Module]] = Registry("net")
NetName = NETS.name_type()  # a config field holding a net name: a drop-down in the run form

# Arguments every builder receives from create_net; everything else is net-specific.
_COMMON_ARGS = ("num_classes", "channels", "image_size")


def register_net(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder `fn(*, num_classes, channels, image_size, **options)` to NETS.

    Annotate the options with their types and ranges (e.g. `width: Width = 128`): NetSpec
    validates configs against them.
    """
    return NETS.register(name)


def list_nets() -> list[str]:
    return sorted(NETS)


@functools.cache
def _options_model(builder: Callable[..., nn.Module]) -> type[BaseModel]:
    """A pydantic model of a builder's keyword options (types, ranges, defaults) from its signature."""
    hints = typing.get_type_hints(builder, include_extras=True)
    fields = {
        p.name: (hints.get(p.name, Any), ... if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(builder).parameters.values()
        if p.name not in _COMMON_ARGS
    }
    return create_model(f"{builder.__name__}_options", __config__=ConfigDict(extra="forbid"), **fields)


def _validated_options(name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the options as the builder takes them, None) or (None, why `create_net(name, **kwargs)` is refused)."""
    if name not in NETS:
        return None, NETS.unknown(name)
    model = _options_model(NETS[name])
    unknown = sorted(set(kwargs) - set(model.model_fields))
    if unknown:
        return (
            None,
            f"net {name!r} got unknown argument(s) {', '.join(unknown)}; valid: {', '.join(model.model_fields)}",
        )
    try:
        options = model(**kwargs)
    except ValidationError as e:
        problems = "; ".join(
            f"{_where(err['loc'])}={err['input']!r}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()
        )
        return None, f"net {name!r} got invalid argument(s): {problems}"
    return {k: getattr(options, k) for k in kwargs}, None


def _where(loc: tuple) -> str:
    """('widths', 1) -> 'widths[1]'."""
    return str(loc[0]) + "".join(f"[{i}]" if isinstance(i, int) else f".{i}" for i in loc[1:])


def net_arg_problem(name: str, kwargs: dict[str, Any]) -> str | None:
    """Why `create_net(name, **kwargs)` would be refused (unknown net, unknown argument, bad value), or None."""
    return _validated_options(name, kwargs)[1]


def create_net(name: str, *, num_classes: int, channels: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Build a registered net; `num_classes` is any output dim (KRR-ST regresses 512-d targets)."""
    options, problem = _validated_options(name, kwargs)
    if problem:
        raise ValueError(problem)
    return NETS[name](num_classes=num_classes, channels=channels, image_size=image_size, **options)


class NetSpec(BaseModel, frozen=True, extra="forbid"):
    """A registered net and its constructor options, validated against the builder when the spec is made."""

    name: str = "convnet"  # a NETS name
    kwargs: dict[str, Any] = {}  # the builder's options, e.g. {"width": 128, "depth": 3}

    @model_validator(mode="after")
    def _fits(self) -> NetSpec:
        problem = net_arg_problem(self.name, self.kwargs)
        if problem:
            raise ValueError(problem)
        return self

    def build(self, *, num_classes: int, channels: int = 3, image_size: int = 32) -> nn.Module:
        return create_net(self.name, num_classes=num_classes, channels=channels, image_size=image_size, **self.kwargs)


class NetFields(BaseModel):
    """Base of configs naming a net by the fields `net` (a NETS name) and `net_kwargs` (its options).

    The subclass declares both fields with its own defaults (so its JSON shape and cache keys
    stay as they are); this base validates them as one NetSpec when the config is built.
    """

    @model_validator(mode="after")
    def _net_args_fit(self) -> NetFields:
        problem = net_arg_problem(self.net, self.net_kwargs)  # type: ignore[attr-defined]
        if problem:
            raise ValueError(problem)
        return self

    @property
    def net_spec(self) -> NetSpec:
        return NetSpec(name=self.net, kwargs=self.net_kwargs)  # type: ignore[attr-defined]


# Norm layers, by name -> factory(num_channels).
# "instance" is MTT's instance norm: per-sample, per-channel statistics with a per-channel affine,
# i.e. GroupNorm with one group per channel (MTT writes it as nn.GroupNorm(C, C)). A hand-written
# mean/var version was once measured ~2x faster under double backward; re-measured
# with torch 2.14 on the 2-core CPU, interleaved runs, the native kernel wins both ways (w32 d3
# 3x32x32, 100 images, 20 unrolled steps + backward: 2.3-4.0 s native vs 3.1-5.3 s hand-written;
# plain training at batch 256: 64-76 ms vs 98 ms per step), so the native kernel is used.
# "layer" normalizes over (C, H, W) with a per-channel affine, so its parameter count does not
# depend on the resolution (MTT's nn.LayerNorm([C, H, W]) has a per-pixel affine).
# "group" uses 32 groups (Wu & He), or fewer when the width is not a multiple of 32.
# "instance_fused" is the same instance norm (same parameter names, shapes and eps, so
# trajectories are interchangeable) with a closed-form double backward (distill.fused_norm):
# under create_graph=True PyTorch replaces GroupNorm's fused backward by a composite graph.
NORMS: Registry[Callable[[int], nn.Module]] = Registry(
    "norm",
    {
        "instance": lambda c: nn.GroupNorm(c, c),
        "batch": nn.BatchNorm2d,
        "layer": lambda c: nn.GroupNorm(1, c),
        "group": lambda c: nn.GroupNorm(math.gcd(32, c), c),
        "none": lambda c: nn.Identity(),
        "instance_fused": InstanceNorm,
    },
)

# Layers with a faster equivalent: same parameters (names, shapes), same values to rounding.
# Trajectory matching builds its student with them (fast_net_kwargs); plain training gains
# little (the fused norm only helps under double backward) and batched evaluation needs vmap.
FAST_EQUIVALENTS: dict[str, dict[str, str]] = {
    "norm": {"instance": "instance_fused"},
    "pooling": {"avg": "avg_fast"},
}


def fast_net_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` of net `name` with every layer option that has a FAST_EQUIVALENTS entry swapped for it,
    defaults included (a convnet without `norm` gets norm='instance_fused')."""
    if name not in NETS:
        raise ValueError(NETS.unknown(name))
    fields = _options_model(NETS[name]).model_fields
    out = dict(kwargs)
    for option, swaps in FAST_EQUIVALENTS.items():
        if option in fields:
            current = out.get(option, fields[option].default)
            if current in swaps:
                out[option] = swaps[current]
    return out


# Never in-place: an in-place activation can overwrite a tensor the double backward needs.
ACTS: Registry[Callable[[], nn.Module]] = Registry(
    "act",
    {
        "relu": nn.ReLU,
        "leakyrelu": lambda: nn.LeakyReLU(0.01),
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
    },
)

# "avg_fast" is "avg" from strided adds (distill.fast_pool): same values to rounding, 3-4x faster
# than the CPU avg_pool2d kernel on NCHW maps, in every derivative order.
POOLS: Registry[Callable[[], nn.Module]] = Registry(
    "pooling",
    {
        "avg": lambda: nn.AvgPool2d(2, 2),
        "max": lambda: nn.MaxPool2d(2, 2),
        "none": nn.Identity,
        "avg_fast": AvgPool2,
    },
)

# Option types of the builders, with the ranges NetSpec enforces.
Width = Annotated[int, Field(ge=1)]  # channels of a conv block
Depth = Annotated[int, Field(ge=1)]  # conv blocks
Widths = Annotated[tuple[Width, ...], Field(min_length=1)]  # channels per block, one block at least
Norm = NORMS.name_type()
Act = ACTS.name_type()
Pooling = POOLS.name_type()


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
        make_norm, make_act, make_pool = NORMS[norm], ACTS[act], POOLS[pooling]
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
    width: Width = 128,
    depth: Depth = 3,
    norm: Norm = "instance",
    act: Act = "relu",
    pooling: Pooling = "avg",
) -> ConvNet:
    """MTT's ConvNet: width 128, depth 3 for 32 px (use depth 4 for 64 px, 5 for 128 px)."""
    return ConvNet(num_classes, channels, image_size, (width,) * depth, norm, act, pooling)


def _convnet_of_depth(depth: int) -> Callable[..., ConvNet]:
    def build(
        *,
        num_classes: int,
        channels: int = 3,
        image_size: int = 32,
        width: Width = 128,
        norm: Norm = "instance",
        act: Act = "relu",
        pooling: Pooling = "avg",
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
    widths: Widths = (32, 64, 128),
    norm: Norm = "batch",
    act: Act = "relu",
    pooling: Pooling = "avg",
) -> ConvNet:
    """KRR-ST's ConvNet: per-block widths with BatchNorm.

    The paper uses (128, 256, 512) at 32 px and (64, 128, 256, 512) at 64 px; the default is a
    CPU-sized 32-64-128.
    """
    return ConvNet(num_classes, channels, image_size, tuple(widths), norm, act, pooling)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: torchvision's, with a 3x3 stride-1 stem and no max-pool; 512-d features."""

    def __init__(self, num_classes: int, channels: int = 3, norm: str = "batch"):
        super().__init__()
        import torchvision  # deferred: importing it costs ~1.4 s in every process that only needs ConvNets

        body = torchvision.models.resnet18(norm_layer=NORMS[norm])
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
def resnet18(*, num_classes: int, channels: int = 3, image_size: int = 32, norm: Norm = "batch") -> ResNet18:
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

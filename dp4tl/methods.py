"""Pruning methods by name: which class selection (or data-wise rule) turns into which kept samples.

A *pruning method* is what a user compares in a DP4TL experiment: label mapping
("lm", "lm_soft"), feature mapping ("fm" over source labels, "fm_kmeans" over K-means clusters),
random class pruning ("random"), the bottom-K label-mapping ablation ("lm_bottom", the reference's
`--reverse`, which should hurt most) and MODERATE data-wise selection at the same kept-image
budget ("moderate"). Each method names the selector it needs (dp4tl.selection.SELECTORS), so a
flow runs one selection per selector and derives every method and ratio from it.

`ratio` is always the fraction of source classes pruned (DP4TL's convention), strictly inside
(0, 1): 0 is the full source (its own comparison arm) and 1 keeps nothing. For "moderate" the
same fraction of *images* is pruned, so it keeps as many images as class pruning at that ratio
would on a balanced source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field, field_validator

from distill.registry import Registry
from dp4tl.baselines import moderate_samples
from dp4tl.formats import KeptSamples
from dp4tl.selection import SELECTORS, ClassSelection


@dataclass(frozen=True)
class PruneMethod:
    """selector: the SELECTORS entry whose ranking it uses (for data-wise methods: the features' net)."""

    selector: str
    reverse: bool = False  # keep the worst-ranked classes (bottom-K ablation)
    data_wise: bool = False  # keep individual samples at an image budget, not whole classes
    description: str = ""

    @property
    def needs_source_images(self) -> bool:
        """Whether the method reads the source images: data-wise methods embed them, feature mapping
        votes over their features; label mapping and random pruning need only the target (and labels)."""
        return self.data_wise or "source_x" in SELECTORS[self.selector].needs


PRUNE_METHODS: Registry[PruneMethod] = Registry(
    "pruning method",
    {
        **{name: PruneMethod(name, description=f"top classes by selector {name!r}") for name in SELECTORS},
        "lm_bottom": PruneMethod("lm", reverse=True, description="bottom-K label mapping (DP4TL --reverse ablation)"),
        "moderate": PruneMethod(
            "lm",
            data_wise=True,
            description="MODERATE data-wise selection (surrogate features) at the same image budget",
        ),
    },
)


PruneMethodName = PRUNE_METHODS.name_type()


def get_method(name: str) -> PruneMethod:
    return PRUNE_METHODS[name]


def check_ratio(ratio: float, num_classes: int | None = None) -> float:
    """Refuse a pruning ratio outside (0, 1), or one that would keep no class of `num_classes`."""
    if not 0 < ratio < 1:
        raise ValueError(
            f"pruning ratio must be strictly between 0 and 1 (the fraction of source classes pruned; "
            f"the full source is compared separately); got {ratio}"
        )
    if num_classes is not None and num_kept_classes(ratio, num_classes) < 1:
        raise ValueError(f"pruning ratio {ratio} keeps no class of {num_classes}")
    if num_classes is not None and num_kept_classes(ratio, num_classes) == num_classes:
        raise ValueError(f"pruning ratio {ratio} prunes no class of {num_classes}; use a larger ratio")
    return ratio


def num_kept_classes(ratio: float, num_classes: int) -> int:
    """Classes kept when `ratio` of `num_classes` are pruned (rounding in favour of keeping, as ClassSelection)."""
    return math.ceil(round((1 - ratio) * num_classes, 9))


def check_target_shape(target_shape: tuple[int, ...], source_shape: tuple[int, ...]) -> None:
    """Refuse target images whose [C, H, W] differs from the images the surrogate was built for."""
    if tuple(target_shape) != tuple(source_shape):
        raise ValueError(
            f"target images are {list(target_shape)} but the surrogate takes {list(source_shape)} (from the "
            "source); give both datasets the same `image_size`, or let the task resize the target "
            "(resize_target: true)"
        )


def kept_samples(
    method: str,
    selection: ClassSelection | None,
    ratio: float,
    seed: int,
    labels: torch.Tensor,
    features: torch.Tensor | None = None,
) -> KeptSamples:
    """The source samples `method` keeps at `ratio`, from its selector's selection (or features, data-wise)."""
    spec = get_method(method)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    check_ratio(ratio)
    if spec.data_wise:
        if features is None:
            raise ValueError(f"pruning method {method!r} needs the source features")
        budget = max(1, math.ceil(round((1 - ratio) * labels.numel(), 9)))
        kept = moderate_samples(features, labels, budget, seed)
        return KeptSamples(method=method, ratio=ratio, seed=seed, kept=kept.tolist(), kept_classes=None)
    if selection is None:
        raise ValueError(f"pruning method {method!r} needs the {spec.selector!r} selection")
    check_ratio(ratio, selection.num_classes)
    kept = KeptSamples.from_selection(selection, ratio, seed, labels, reverse=spec.reverse)
    return KeptSamples(method=method, ratio=ratio, seed=seed, kept=kept.kept, kept_classes=kept.kept_classes)


class SelectionConfig(BaseModel, frozen=True, extra="forbid"):
    """Which pruning methods to run, at which ratios and seeds, and how the target is read."""

    # The default comparison: both mappings, random class pruning and the bottom-K ablation.
    methods: list[PruneMethodName] = Field(
        default_factory=lambda: ["lm", "fm", "random", "lm_bottom"],
        min_length=1,
        description=(
            "Pruning methods to compare, distinct: lm/lm_soft = label mapping, fm = feature mapping over "
            "source labels, fm_kmeans = over K-means clusters, random = random classes, lm_bottom = the "
            "bottom-K ablation, moderate = MODERATE data-wise selection at the same image budget."
        ),
    )
    ratios: list[float] = Field(
        default_factory=lambda: [0.5, 0.8],
        min_length=1,
        description=(
            "Fractions of source classes pruned, each strictly between 0 and 1 (the full source is "
            "its own comparison arm); for moderate, the fraction of images."
        ),
    )
    # the effect of a pruning method is small next to seed noise
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description=("Seeds; each method runs once per seed (selection, pretraining and transfer). Use at least 3."),
    )
    k_clusters: int | None = Field(
        None,
        ge=1,
        description=("fm_kmeans: number of K-means clusters; empty = the number of source classes (the paper)."),
    )
    batch_size: int = Field(
        1024, ge=1, description=("Images per surrogate inference batch: affects memory only, not results.")
    )
    resize_target: bool = Field(
        True,
        description=(
            "Resize target images whose size differs from the source's to it (bilinear, antialiased); "
            "false refuses them instead, naming both sizes."
        ),
    )

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods must be distinct; got {methods}")
        return methods

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, ratios: list[float]) -> list[float]:
        for r in ratios:
            check_ratio(r)
        return sorted(set(ratios))

    def selectors(self) -> list[str]:
        """The SELECTORS the methods need, each run once per seed."""
        return sorted({get_method(m).selector for m in self.methods})

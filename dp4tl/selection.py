"""DP4TL source-class selection: label mapping (LM) and feature mapping (FM), plus the selector registry.

DP4TL (Zhang et al., "Selectivity Drives Productivity", NeurIPS 2023) ranks
the *classes* of a source dataset by how much the target "uses" them, and pretrains on the top
ones only:

- LM: run a surrogate trained on the full source over the target training set (eval mode, no
  augmentation) and count, per source class, the target images whose argmax logit it is.
- FM: nearest-centroid voting in the surrogate's penultimate feature space. Each target feature
  votes for the source group (class, or K-means cluster of source features in the paper's
  self-supervised setting) with the nearest centroid.

Differences from the reference code, on purpose:

- FM computes the full [N_target, G] distance matrix. `fm_selection_for_imagenet.py` writes
  every centroid's distance into the same entry, so its argmin is meaningless.
- Rankings are total and deterministic. The reference `topk` over a histogram leaves the order
  of tied (typically zero-vote) classes to the kernel, so high retain ratios are partly random.
  LM breaks ties by summed softmax mass, FM by mean distance, then class id.
- The clustering the paper's SSL FM needs is not in the repo; here it is
  scikit-learn K-means with a fixed seed and n_init.

Every selector returns a `ClassSelection`; `kept_classes(ratio)` applies DP4TL's convention that
the ratio is the fraction of classes *pruned*. Class-level selectors are registered in
SELECTORS under a uniform signature `fn(SelectionInputs) -> ClassSelection` so flows and tests
iterate over the registry instead of branching on names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from distill.registry import Registry
from distill.train import extract_features
from distill.utils import resolve_device

# Target rows per torch.cdist call: bounds the [rows, G] block (and cdist's own workspace) to a
# few MiB even for 1000 groups, while keeping the per-call overhead negligible.
_DISTANCE_ROWS = 4096
# K-means restarts: fixed so a seed fully determines the clusters; 3 is scikit-learn's usual
# trade-off between the best of several k-means++ starts and the cost of each full run.
KMEANS_N_INIT = 3


@dataclass(frozen=True, eq=False)
class ClassSelection:
    """A ranking of source classes (or clusters) for pruning: `ranking[0]` is the most useful group.

    scores: float64 [C], the primary ranking quantity normalised per target image (vote fraction,
        or mean probability for soft LM); higher is better.
    votes: int64 [C], target images assigned to each group.
    ranking: int64 [C], a permutation of 0..C-1, best first, ties already broken.
    details: method-specific extras: per-group tensors [C] (tie-break keys), scalars, and for
        clustered FM `cluster_of_sample` (int64 [N_source], the group of every source sample).
    """

    scores: torch.Tensor
    votes: torch.Tensor
    ranking: torch.Tensor
    method: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if c < 1 or self.votes.shape != (c,) or self.ranking.shape != (c,):
            raise ValueError(
                f"scores, votes and ranking must be 1-D of one length >= 1; got "
                f"{list(self.scores.shape)}, {list(self.votes.shape)}, {list(self.ranking.shape)}"
            )
        if not torch.equal(torch.sort(self.ranking.long()).values, torch.arange(c)):
            raise ValueError(f"ranking must be a permutation of 0..{c - 1}")

    @property
    def num_classes(self) -> int:
        return int(self.scores.shape[0])

    @property
    def rank(self) -> torch.Tensor:
        """int64 [C]: the rank of every class (0 = best), the inverse permutation of `ranking`."""
        rank = torch.empty(self.num_classes, dtype=torch.int64)
        rank[self.ranking] = torch.arange(self.num_classes)
        return rank

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.num_classes:
            raise ValueError(f"k must be in 1..{self.num_classes} (the number of classes); got {k}")
        return k

    def top_k(self, k: int) -> torch.Tensor:
        """The k best classes, best first."""
        return self.ranking[: self._check_k(k)].clone()

    def bottom_k(self, k: int) -> torch.Tensor:
        """The k worst classes, worst first: DP4TL's `--reverse` ablation (topk with largest=False)."""
        return self.ranking.flip(0)[: self._check_k(k)].clone()

    def num_kept(self, ratio: float) -> int:
        """Classes kept when `ratio` of them are pruned; rounds in favour of keeping (never prunes more)."""
        if not 0 <= ratio < 1:
            raise ValueError(f"pruning ratio must be in [0, 1) (fraction of classes pruned); got {ratio}")
        # round() first: (1 - 0.7) * 100 is 30.000000000000004, whose ceil would keep 31.
        return self._check_k(math.ceil(round((1 - ratio) * self.num_classes, 9)))

    def kept_classes(self, ratio: float, *, reverse: bool = False) -> torch.Tensor:
        """Sorted ids of the classes kept when pruning `ratio` of them (the worst ones, or the best if reverse)."""
        k = self.num_kept(ratio)
        return torch.sort(self.bottom_k(k) if reverse else self.top_k(k)).values

    def kept_samples(self, ratio: float, labels: torch.Tensor | None = None, *, reverse: bool = False) -> torch.Tensor:
        """Sorted indices of the source samples whose group is kept: DP4TL keeps every image of a kept class.

        The group of a sample is `details["cluster_of_sample"]` for clustered FM, else `labels`.
        """
        groups = self.details.get("cluster_of_sample", labels)
        if groups is None:
            raise ValueError(f"selection {self.method!r} is over source labels; pass the source labels")
        groups = torch.as_tensor(groups, dtype=torch.int64)
        return torch.isin(groups, self.kept_classes(ratio, reverse=reverse)).nonzero().flatten()


def rank_groups(primary: torch.Tensor, secondary: torch.Tensor, *, secondary_descending: bool) -> torch.Tensor:
    """A total order, best first: primary descending, then secondary (asc or desc), then group id ascending."""
    primary_np = primary.detach().cpu().double().numpy()
    secondary_np = secondary.detach().cpu().double().numpy()
    ids = np.arange(len(primary_np))
    # lexsort sorts by the last key first; negating turns "descending" into ascending.
    order = np.lexsort((ids, -secondary_np if secondary_descending else secondary_np, -primary_np))
    return torch.from_numpy(order).long()


# ---------------------------------------------------------------- label mapping


@torch.no_grad()
def _logits(net: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device):
    """Yield CPU float32 logits of net(x) in eval mode, batch by batch; restores the net's mode."""
    was_training = net.training
    net.to(device).eval()
    try:
        for i in range(0, x.shape[0], batch_size):
            yield net(x[i : i + batch_size].to(device, torch.float32)).float().cpu()
    finally:
        net.train(was_training)


def label_mapping(
    surrogate: nn.Module,
    target_x: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    soft: bool = False,
) -> ClassSelection:
    """LM: votes[c] = target images whose argmax surrogate logit is source class c (DP4TL's hard frequency).

    target_x: the target *training* images, preprocessed exactly as the surrogate's source
    (float [N, C, H, W]); no augmentation is applied (the reference decodes with scale 1, no flip).
    Ranking: (votes desc, summed softmax mass desc, class id asc), so classes without votes are
    ordered by how much probability the target puts on them.
    soft=True ranks by summed softmax mass first (votes, then id, break ties), method "lm_soft".
    """
    if target_x.ndim < 2 or target_x.shape[0] == 0:
        raise ValueError(f"label mapping needs a non-empty target batch [N, ...]; got {list(target_x.shape)}")
    dev = resolve_device(device)
    votes: torch.Tensor | None = None
    mass: torch.Tensor | None = None
    for logits in _logits(surrogate, target_x, batch_size, dev):
        batch_votes = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
        # float64 sums: with 10^5 target images float32 would lose the small masses that break ties.
        batch_mass = logits.double().softmax(1).sum(0)
        votes = batch_votes if votes is None else votes + batch_votes
        mass = batch_mass if mass is None else mass + batch_mass
    n = target_x.shape[0]
    if soft:
        ranking = rank_groups(mass, votes, secondary_descending=True)
        scores = mass / n
    else:
        ranking = rank_groups(votes, mass, secondary_descending=True)
        scores = votes.double() / n
    return ClassSelection(
        scores=scores,
        votes=votes,
        ranking=ranking,
        method="lm_soft" if soft else "lm",
        details={"softmax_mass": mass / n, "num_target": n},
    )


# ---------------------------------------------------------------- feature mapping


def kmeans_groups(features: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, float]:
    """scikit-learn K-means of source features: (cluster id per sample int64 [N], inertia)."""
    from sklearn.cluster import KMeans  # deferred: ~1 s import that only clustered FM needs

    if not 1 <= k <= features.shape[0]:
        raise ValueError(f"k_clusters must be in 1..{features.shape[0]} (the number of source samples); got {k}")
    km = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=seed).fit(features.double().numpy())
    return torch.from_numpy(km.labels_.astype(np.int64)), float(km.inertia_)


def nearest_centroid_votes(
    target_features: torch.Tensor, centroids: torch.Tensor, *, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every target feature votes for its nearest centroid: (nearest [N], votes [G], mean distance [G]).

    The full [N, G] L2 distance matrix is computed (in row blocks), one column per centroid; the
    reference FM script overwrote a single entry per target instead. Groups with
    valid=False (no source samples) get no votes and an infinite mean distance.
    """
    g = centroids.shape[0]
    valid = torch.ones(g, dtype=torch.bool) if valid is None else valid
    centroids = torch.where(valid[:, None], centroids, torch.zeros_like(centroids)).double()
    nearest, distance_sum = [], torch.zeros(g, dtype=torch.float64)
    for i in range(0, target_features.shape[0], _DISTANCE_ROWS):
        d = torch.cdist(target_features[i : i + _DISTANCE_ROWS].double(), centroids)
        distance_sum += d.sum(0)
        # argmin returns the first minimum, so exact ties go to the lower group id.
        nearest.append(d.masked_fill(~valid, math.inf).argmin(1))
    nearest_all = torch.cat(nearest)
    votes = torch.bincount(nearest_all, minlength=g)
    mean_distance = (distance_sum / target_features.shape[0]).masked_fill(~valid, math.inf)
    return nearest_all, votes, mean_distance


def feature_mapping(
    extractor: nn.Module,
    source_x: torch.Tensor,
    source_labels: torch.Tensor | None,
    target_x: torch.Tensor,
    *,
    k_clusters: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> ClassSelection:
    """FM: rank source groups by nearest-centroid votes of the target's penultimate features.

    Groups are the source labels (DP4TL's shipped `feature_gen --class_wise` pipeline; give
    `num_classes` so classes absent from `source_x` still get a row), or, with source_labels=None,
    K-means clusters of the source features (the paper's self-supervised FM; k_clusters required,
    `details["cluster_of_sample"]` maps every source sample to its cluster). Ranking: (votes desc,
    mean distance of the target to the centroid asc, group id asc). Method "fm" or "fm_kmeans".
    """
    if target_x.shape[0] == 0 or source_x.shape[0] == 0:
        raise ValueError("feature mapping needs non-empty source and target sets")
    dev = resolve_device(device)
    source_f = extract_features(extractor, source_x, device=dev, batch_size=batch_size)
    target_f = extract_features(extractor, target_x, device=dev, batch_size=batch_size)
    details: dict = {"num_target": target_x.shape[0], "feature_dim": source_f.shape[1]}
    if source_labels is None:
        if k_clusters is None:
            raise ValueError("label-free feature mapping needs k_clusters (e.g. the number of source classes)")
        groups, inertia = kmeans_groups(source_f, k_clusters, seed)
        num_groups, method = k_clusters, "fm_kmeans"
        details.update(cluster_of_sample=groups, kmeans_inertia=inertia, kmeans_seed=seed)
    else:
        if k_clusters is not None:
            raise ValueError("give either source_labels (groups = classes) or k_clusters (K-means), not both")
        groups = torch.as_tensor(source_labels, dtype=torch.int64)
        if groups.shape != (source_x.shape[0],):
            raise ValueError(f"source_labels must be [N={source_x.shape[0]}]; got {list(groups.shape)}")
        num_groups = num_classes if num_classes is not None else int(groups.max()) + 1
        if int(groups.min()) < 0 or int(groups.max()) >= num_groups:
            raise ValueError(
                f"source labels must lie in [0, {num_groups}); got [{int(groups.min())}, {int(groups.max())}]"
            )
        method = "fm"
    sizes = torch.bincount(groups, minlength=num_groups)
    sums = torch.zeros(num_groups, source_f.shape[1], dtype=torch.float64).index_add_(0, groups, source_f.double())
    centroids = sums / sizes.clamp_min(1)[:, None]
    _, votes, mean_distance = nearest_centroid_votes(target_f, centroids, valid=sizes > 0)
    details.update(mean_distance=mean_distance, group_size=sizes)
    return ClassSelection(
        scores=votes.double() / target_x.shape[0],
        votes=votes,
        ranking=rank_groups(votes, mean_distance, secondary_descending=False),
        method=method,
        details=details,
    )


# ---------------------------------------------------------------- registry


@dataclass(frozen=True, eq=False)
class SelectionInputs:
    """Everything a class-level selector may read; each selector checks the fields it needs."""

    num_classes: int  # source classes (LM's head size, FM's groups when labelled)
    surrogate: nn.Module | None = None  # trained on the full source; FM uses its `embed`
    target_x: torch.Tensor | None = None  # target training images, preprocessed like the source
    source_x: torch.Tensor | None = None
    source_y: torch.Tensor | None = None
    k_clusters: int | None = None  # fm_kmeans; default num_classes (as many clusters as classes)
    seed: int = 0
    batch_size: int = 1024
    device: str | torch.device | None = None

    def require(self, method: str, *names: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"selector {method!r} needs {', '.join(missing)} in its SelectionInputs")


@dataclass(frozen=True)
class Selector:
    """A registered class-level selector: `fn(SelectionInputs) -> ClassSelection` and the inputs it reads."""

    name: str
    fn: Callable[[SelectionInputs], ClassSelection]
    needs: tuple[str, ...]  # SelectionInputs fields that must not be None

    def __call__(self, inputs: SelectionInputs) -> ClassSelection:
        inputs.require(self.name, *self.needs)
        return self.fn(inputs)


SELECTORS: Registry[Selector] = Registry("selector")


def register_selector(name: str, needs: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding `fn(SelectionInputs) -> ClassSelection` to SELECTORS; `needs`: the inputs it reads."""

    def add(fn: Callable[[SelectionInputs], ClassSelection]) -> Callable[[SelectionInputs], ClassSelection]:
        SELECTORS.register(name)(Selector(name, fn, tuple(needs)))
        return fn

    return add


def get_selector(name: str) -> Selector:
    return SELECTORS[name]


def select_classes(name: str, inputs: SelectionInputs) -> ClassSelection:
    """Run the registered selector `name` and check it scored every source class (or cluster)."""
    selection = get_selector(name)(inputs)
    clustered = "cluster_of_sample" in selection.details
    expected = (inputs.k_clusters or inputs.num_classes) if clustered else inputs.num_classes
    if selection.num_classes != expected:
        raise ValueError(f"selector {name!r} scored {selection.num_classes} groups; expected {expected}")
    return selection


@register_selector("lm", needs=("surrogate", "target_x"))
def _lm(inputs: SelectionInputs) -> ClassSelection:
    return label_mapping(inputs.surrogate, inputs.target_x, batch_size=inputs.batch_size, device=inputs.device)


@register_selector("lm_soft", needs=("surrogate", "target_x"))
def _lm_soft(inputs: SelectionInputs) -> ClassSelection:
    return label_mapping(
        inputs.surrogate, inputs.target_x, batch_size=inputs.batch_size, device=inputs.device, soft=True
    )


@register_selector("fm", needs=("surrogate", "source_x", "source_y", "target_x"))
def _fm(inputs: SelectionInputs) -> ClassSelection:
    return feature_mapping(
        inputs.surrogate,
        inputs.source_x,
        inputs.source_y,
        inputs.target_x,
        num_classes=inputs.num_classes,
        seed=inputs.seed,
        batch_size=inputs.batch_size,
        device=inputs.device,
    )


@register_selector("fm_kmeans", needs=("surrogate", "source_x", "target_x"))
def _fm_kmeans(inputs: SelectionInputs) -> ClassSelection:
    return feature_mapping(
        inputs.surrogate,
        inputs.source_x,
        None,
        inputs.target_x,
        k_clusters=inputs.k_clusters or inputs.num_classes,
        seed=inputs.seed,
        batch_size=inputs.batch_size,
        device=inputs.device,
    )


def random_classes(num_classes: int, seed: int) -> ClassSelection:
    """A uniformly random ranking of the source classes, fixed by `seed` (method "random").

    The honest baseline of every class selection: random class pruning at the same ratio.
    scores are 1 - rank / C so that, as for every selection, higher is better; votes are zero.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    ranking = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    rank = torch.empty(num_classes, dtype=torch.int64)
    rank[ranking] = torch.arange(num_classes)
    return ClassSelection(
        scores=1.0 - rank.double() / num_classes,
        votes=torch.zeros(num_classes, dtype=torch.int64),
        ranking=ranking,
        method="random",
        details={"seed": seed},
    )


@register_selector("random")
def _random(inputs: SelectionInputs) -> ClassSelection:
    return random_classes(inputs.num_classes, inputs.seed)

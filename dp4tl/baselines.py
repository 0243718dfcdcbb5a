"""Baselines for DP4TL source pruning: MODERATE data-wise selection at a matched image budget.

The honest comparison for class selection at a pruning ratio is random class pruning at the same
ratio, which DP4TL ("Selectivity Drives Productivity", Zhang et al., NeurIPS 2023) compares
against; it is a class-level selector, `dp4tl.selection.random_classes` (registered "random"
beside label and feature mapping). The LM bottom-K ablation (the reference `--reverse`) is
`ClassSelection.kept_classes(ratio, reverse=True)` rather than a selector of its own. A
data-wise selector kept at the *same number of images* separates "which classes" from "how many
images": MODERATE (Xia et al., ICLR 2023), as in the reference's
`data_wise_moderate_selection.py`, keeps per class the samples of median difficulty, measured by
the distance of their feature to the class's median feature.
"""

from __future__ import annotations

import torch


def proportional_quotas(counts: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
    """Split `budget` over groups in proportion to `counts` (largest remainder); int64 [G], sums to budget.

    Each group gets floor(budget * n_g / N), and the leftover units go to the largest fractional
    parts; equal fractions are ordered by a seeded permutation so no group id is favoured.
    """
    counts = counts.long()
    total = int(counts.sum())
    if not 1 <= budget <= total:
        raise ValueError(f"budget must be in 1..{total} (the number of samples); got {budget}")
    exact = counts.double() * budget / total
    quotas = exact.floor().long()
    left = budget - int(quotas.sum())
    if left:
        order = torch.randperm(len(counts), generator=torch.Generator().manual_seed(seed))
        remainder = (exact - quotas.double())[order]
        # Stable sort keeps the seeded order among equal remainders.
        winners = order[torch.sort(remainder, descending=True, stable=True).indices[:left]]
        quotas[winners] += 1
    return quotas


def moderate_samples(features: torch.Tensor, labels: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
    """MODERATE: exactly `budget` sample indices (sorted), spread over classes in proportion to their size.

    Per class c: d_i = ||f_i - median_c||_2 with median_c the coordinate-wise median feature; keep
    the quota_c samples whose d_i is closest to the median of the class's d (neither the easiest,
    near the centre, nor the hardest or mislabelled, far out). Exact ties are ordered by a seeded
    permutation.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be [N, D] with labels [N]; got {list(features.shape)}, {list(labels.shape)}")
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError("labels must be non-empty and non-negative")
    quotas = proportional_quotas(torch.bincount(labels), budget, seed)
    features = features.double()
    kept = []
    for c in quotas.nonzero().flatten().tolist():
        members = (labels == c).nonzero().flatten()
        f = features[members]
        d = torch.linalg.vector_norm(f - f.median(0).values, dim=1)
        gap = (d - d.median()).abs()
        # Shuffle first, then stable-sort: equal gaps come out in a seeded random order.
        shuffle = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed * 1_000_003 + c))
        order = shuffle[torch.sort(gap[shuffle], stable=True).indices]
        kept.append(members[order[: int(quotas[c])]])
    return torch.sort(torch.cat(kept)).values

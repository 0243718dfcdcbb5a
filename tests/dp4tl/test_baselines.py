"""Tests of the DP4TL baselines: seeded random class pruning, the bottom-K ablation, MODERATE at a budget."""

from __future__ import annotations

import pytest
import torch

from dp4tl.baselines import moderate_samples, proportional_quotas
from dp4tl.selection import SELECTORS, SelectionInputs, random_classes


def test_random_ranking_is_a_seeded_permutation():
    a, b, c = random_classes(50, seed=0), random_classes(50, seed=0), random_classes(50, seed=1)
    assert torch.equal(a.ranking, b.ranking) and not torch.equal(a.ranking, c.ranking)
    assert sorted(a.ranking.tolist()) == list(range(50))
    assert a.method == "random" and int(a.votes.sum()) == 0
    # Scores agree with the ranking: strictly decreasing along it.
    assert bool((a.scores[a.ranking].diff() < 0).all())
    assert torch.equal(SELECTORS["random"](SelectionInputs(num_classes=50, seed=1)).ranking, c.ranking)


def test_bottom_k_is_the_reverse_of_top_k():
    sel = random_classes(10, seed=3)
    assert sel.bottom_k(10).tolist() == sel.top_k(10).flip(0).tolist()
    assert sel.bottom_k(3).tolist() == sel.ranking[-3:].flip(0).tolist()
    top, bottom = set(sel.kept_classes(0.5).tolist()), set(sel.kept_classes(0.5, reverse=True).tolist())
    assert len(top) == len(bottom) == 5 and not top & bottom


def test_proportional_quotas_largest_remainder():
    counts = torch.tensor([50, 30, 20])
    assert proportional_quotas(counts, 10, seed=0).tolist() == [5, 3, 2]
    assert proportional_quotas(counts, 7, seed=0).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4: the .5 wins
    assert proportional_quotas(counts, 100, seed=0).tolist() == [50, 30, 20]
    # Equal remainders: the seed, not the class id, decides who gets the extra image.
    winners = {tuple(proportional_quotas(torch.tensor([10, 10, 10]), 2, seed=s).tolist()) for s in range(20)}
    assert len(winners) == 3 and all(sum(w) == 2 and max(w) == 1 for w in winners)
    for budget in (0, 101):
        with pytest.raises(ValueError, match=r"budget must be in 1\.\.100"):
            proportional_quotas(counts, budget, seed=0)


def test_moderate_returns_exactly_budget_unique_indices_per_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=g)]
    features = torch.randn(100, 8, generator=g)
    kept = moderate_samples(features, labels, 10, seed=0)
    assert len(kept) == len(set(kept.tolist())) == 10 and torch.equal(kept, kept.sort().values)
    assert torch.bincount(labels[kept], minlength=3).tolist() == [5, 3, 2]
    assert torch.equal(kept, moderate_samples(features, labels, 10, seed=0))


def test_moderate_keeps_samples_at_the_median_distance():
    # One class on a line at 0..10: median feature 5, distances 5,4,3,2,1,0,1,2,3,4,5, whose median
    # is 3, so the two "moderate" samples are x=2 and x=8 (neither the centre nor the extremes).
    features = torch.arange(11, dtype=torch.float32)[:, None]
    labels = torch.zeros(11, dtype=torch.long)
    assert moderate_samples(features, labels, 2, seed=0).tolist() == [2, 8]
    four = moderate_samples(features, labels, 4, seed=0).tolist()
    assert {2, 8} < set(four) and len(set(four) & {1, 3, 7, 9}) == 2  # then two of distance 2 or 4


def test_moderate_refuses_bad_inputs():
    with pytest.raises(ValueError, match="features must be"):
        moderate_samples(torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), 2, seed=0)
    with pytest.raises(ValueError, match=r"budget must be in 1\.\.5"):
        moderate_samples(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), 6, seed=0)

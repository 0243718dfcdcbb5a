"""Pruning methods end to end with a really trained surrogate, where the right answer is known.

The source has six classes, each a fixed random 8x8 pattern plus noise; the target is fresh
images of source classes 1 and 4 only. Every mapping (LM, soft LM, FM over labels, FM over
K-means clusters) must keep exactly those two classes when pruning 4 of 6, and bottom-K must
keep neither.
"""

from __future__ import annotations

import pytest
import torch

from distill.train import TrainConfig
from dp4tl.methods import PRUNE_METHODS, check_ratio, check_target_shape, get_method, kept_samples
from dp4tl.selection import SELECTORS, SelectionInputs, select_classes
from dp4tl.surrogate import SurrogateConfig, train_surrogate

TARGET_CLASSES = [1, 4]
RATIO = 4 / 6  # prune four classes, keep two


def _patterns(labels: torch.Tensor, seed: int) -> torch.Tensor:
    templates = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    noise = torch.randn(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return templates[labels] + 0.3 * noise


@pytest.fixture(scope="module")
def world():
    source_y = torch.arange(6).repeat(30)
    source_x = _patterns(source_y, seed=0)
    target_y = torch.tensor(TARGET_CLASSES).repeat(15)
    cfg = SurrogateConfig(
        net_kwargs={"width": 8, "depth": 1},
        train=TrainConfig(epochs=8, batch_size=32, lr=0.05, schedule="cosine", augment="none"),
    )
    net = train_surrogate(cfg, source_x, source_y, 6, device="cpu")
    inputs = SelectionInputs(
        num_classes=6,
        surrogate=net,
        target_x=_patterns(target_y, seed=1),
        source_x=source_x,
        source_y=source_y,
        device="cpu",
    )
    return inputs, source_y


@pytest.mark.parametrize("selector", ["lm", "lm_soft", "fm", "fm_kmeans"])
def test_a_target_made_of_source_classes_selects_exactly_those(world, selector):
    inputs, source_y = world
    selection = select_classes(selector, inputs)
    kept = kept_samples(selector, selection, RATIO, seed=0, labels=source_y)
    assert sorted(set(source_y[kept.kept].tolist())) == TARGET_CLASSES
    assert kept.kept == (torch.isin(source_y, torch.tensor(TARGET_CLASSES))).nonzero().flatten().tolist()
    if selector in ("lm", "fm"):
        assert sorted(selection.top_k(2).tolist()) == TARGET_CLASSES
        assert int(selection.votes.sum()) == 30 and int(selection.votes[TARGET_CLASSES].sum()) == 30


def test_bottom_k_keeps_none_of_the_target_classes(world):
    inputs, source_y = world
    selection = select_classes("lm", inputs)
    bottom = kept_samples("lm_bottom", selection, 0.5, seed=0, labels=source_y)
    assert bottom.method == "lm_bottom" and len(bottom.kept_classes) == 3
    assert not set(bottom.kept_classes) & set(TARGET_CLASSES)


def test_moderate_keeps_the_same_image_budget(world):
    inputs, source_y = world
    feats = torch.randn(len(source_y), 4, generator=torch.Generator().manual_seed(0))
    kept = kept_samples("moderate", None, 0.5, seed=0, labels=source_y, features=feats)
    assert len(kept.kept) == 90 and kept.kept_classes is None
    assert torch.bincount(source_y[kept.kept]).tolist() == [15] * 6  # proportional to class sizes


def test_every_method_names_a_registered_selector():
    assert {m.selector for m in PRUNE_METHODS.values()} <= set(SELECTORS)
    with pytest.raises(
        ValueError, match="unknown pruning method 'top'; valid: lm, lm_soft, fm, fm_kmeans, random, lm_bottom, moderate"
    ):
        get_method("top")


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratios_outside_zero_one_are_refused(ratio):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        check_ratio(ratio)


def test_a_ratio_that_prunes_nothing_is_refused():
    assert check_ratio(0.5, 10) == 0.5
    with pytest.raises(ValueError, match="prunes no class of 3"):
        check_ratio(0.1, 3)


def test_target_shape_mismatch_is_a_clear_error():
    check_target_shape((3, 32, 32), (3, 32, 32))
    with pytest.raises(ValueError, match=r"target images are \[3, 64, 64\] but the surrogate takes \[3, 32, 32\]"):
        check_target_shape((3, 64, 64), (3, 32, 32))


def test_data_wise_method_needs_features(world):
    _, source_y = world
    with pytest.raises(ValueError, match="needs the source features"):
        kept_samples("moderate", None, 0.5, seed=0, labels=source_y)

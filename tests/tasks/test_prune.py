"""Stages surrogate / selection / pruned as plain functions on a synthetic world with a known answer.

The target is made of source classes 1 and 4 (tests/tasks/prune_world.py), so label and
feature mapping must keep exactly those, and the pruned source must read back through
tasks.datasets like any materialized dataset.
"""

from __future__ import annotations

import pytest
import torch

from distill.data import DataError, ImageSet
from dp4tl.formats import read_kept, read_selection
from dp4tl.methods import SelectionConfig
from dp4tl.surrogate import save_surrogate
from tasks import prune
from tasks.datasets import class_counts, load_split, preprocessed
from tests.tasks.prune_world import SURROGATE, TARGET_CLASSES, materialize_world

RATIOS = [0.5, 2 / 3]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-world")
    store = str(root / "store")
    source, target = materialize_world(root, store)
    surrogate = prune.surrogate.fn(source, SURROGATE, store)
    return store, source, target, surrogate


def _select(world, method, seed=0, **kw):
    store, source, target, surrogate = world
    return prune.select.fn(source, target, surrogate, method, seed, SelectionConfig(ratios=RATIOS, **kw), store)


def test_surrogate_is_stored_and_reused(world):
    store, source, _, ref = world
    manifest = ref.open().manifest
    assert manifest["num_classes"] == 6 and manifest["image_shape"] == [3, 8, 8] and len(manifest["fingerprint"]) == 16
    again = prune.surrogate.fn(source, SURROGATE, store)
    assert again == ref and again.open().manifest["created_at"] == manifest["created_at"]
    net = prune.load_surrogate_net(ref)
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 6)


@pytest.mark.parametrize("method", ["lm", "lm_soft", "fm", "fm_kmeans"])
def test_mappings_keep_exactly_the_target_classes(world, method):
    store, source, target, surrogate = world
    ref = _select(world, method)
    art = ref.open()
    assert art.manifest["surrogate_fingerprint"] == surrogate.open().manifest["fingerprint"]
    assert art.manifest["features"]["resolution"] == 8 and art.manifest["features"]["augmentation"] == "none"
    rows = {r.ratio: r for r in read_kept(art.file("kept.parquet"))}
    labels = load_split(source, "train").labels
    assert sorted(set(labels[rows[2 / 3].kept].tolist())) == TARGET_CLASSES
    if method != "fm_kmeans":
        assert rows[2 / 3].kept_classes == TARGET_CLASSES
        selection, names, meta = read_selection(art.file("selection.parquet"))
        assert names[1] == "pattern-1" and meta["surrogate_fingerprint"] == art.manifest["surrogate_fingerprint"]


def test_pruned_source_reads_like_a_materialized_dataset(world):
    store, source, target, _ = world
    ref = _select(world, "lm")
    pruned = prune.materialize_pruned.fn(source, ref, 2 / 3, store)
    manifest = pruned.open().manifest
    assert set(source.open().manifest) <= set(manifest)  # every key of stage `dataset`, and more
    assert class_counts(pruned) == [0, 30, 0, 0, 30, 0]
    assert manifest["class_names"] == source.open().manifest["class_names"]
    train = load_split(pruned, "train")
    full = load_split(source, "train")
    keep = torch.isin(full.labels, torch.tensor(TARGET_CLASSES))
    assert torch.equal(train.images, full.images[keep]) and torch.equal(train.labels, full.labels[keep])
    assert sorted(set(load_split(pruned, "test").labels.tolist())) == TARGET_CLASSES
    x, y, names = preprocessed(pruned, "train")
    assert x.dtype == torch.float32 and len(names) == 6
    # Seeds of a deterministic method keep the same samples, so they share one pruned dataset.
    assert prune.materialize_pruned.fn(source, _select(world, "lm", seed=1), 2 / 3, store) == pruned


def test_random_and_bottom_k(world):
    store, source, *_ = world
    a, b = (read_kept(_select(world, "random", seed=s).open().file("kept.parquet")) for s in (0, 1))
    assert [r.kept_classes for r in a] != [r.kept_classes for r in b], "random pruning depends on the seed"
    bottom = read_kept(_select(world, "lm_bottom").open().file("kept.parquet"))
    assert all(not set(r.kept_classes) & set(TARGET_CLASSES) for r in bottom)


def test_class_table_lists_top_and_bottom_with_names_and_votes(world):
    rows = prune.class_table(_select(world, "lm"), top=2)
    top = [r for r in rows if r["end"] == "top"]
    assert sorted(r["class"] for r in top) == TARGET_CLASSES and sum(r["votes"] for r in top) == 24
    assert {r["name"] for r in top} == {"pattern-1", "pattern-4"}
    assert [r["end"] for r in rows].count("bottom") == 2


def test_user_weights_are_checked_and_adopted(world, tmp_path):
    store, source, _, ref = world
    net = prune.load_surrogate_net(ref)
    path = tmp_path / "mine.safetensors"
    save_surrogate(net, str(path))
    mine = prune.surrogate.fn(source, SURROGATE, store, weights=str(path))
    assert mine != ref and mine.open().manifest["fingerprint"] == ref.open().manifest["fingerprint"]
    wrong = SURROGATE.model_copy()
    from dp4tl.surrogate import train_surrogate

    other = train_surrogate(wrong, torch.randn(8, 3, 8, 8), torch.arange(8) % 4, 4, device="cpu")
    save_surrogate(other, str(tmp_path / "four.safetensors"))
    with pytest.raises(ValueError, match="head has 4 classes, but the source has 6"):
        prune.surrogate.fn(source, SURROGATE, store, weights=str(tmp_path / "four.safetensors"))


def test_target_of_another_size_is_resized_or_refused(world):
    store, source, target, _ = world
    assert prune.target_inputs(target, source, resize=True).shape == (24, 3, 8, 8)
    with pytest.raises(ValueError, match=r"target images are \[3, 16, 16\] but the surrogate takes \[3, 8, 8\]"):
        prune.target_inputs(target, source, resize=False)


def test_empty_target_split_is_refused(world, monkeypatch):
    store, source, target, _ = world
    empty = ImageSet(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), ["a"], "x")
    monkeypatch.setattr(prune, "load_split", lambda ref, split: empty)
    with pytest.raises(DataError, match="target's train split is empty"):
        prune.target_inputs(target, source, resize=True)


def test_unknown_ratio_is_named(world):
    with pytest.raises(ValueError, match=r"has no ratio 0.3; it has \[0.5, 0.6666"):
        prune.materialize_pruned.fn(world[1], _select(world, "lm"), 0.3, world[0])

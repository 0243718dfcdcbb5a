"""Tests of DP4TL label and feature mapping, the selector registry and the selection Parquet formats.

Inputs are built so the right answer is known: a fake surrogate whose logits are a fixed table
(label mapping), identity "features" in well separated 2-D blobs (feature mapping).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

import dp4tl.selection as selection_module
from distill.formats import FormatError
from distill.nets import create_net
from dp4tl.baselines import moderate_samples
from dp4tl.formats import KeptSamples, read_kept, read_selection, write_kept, write_selection
from dp4tl.selection import (
    SELECTORS,
    ClassSelection,
    SelectionInputs,
    feature_mapping,
    get_selector,
    label_mapping,
    nearest_centroid_votes,
    select_classes,
)


class TableNet(nn.Module):
    """A "surrogate" whose logits for input row [i] are table[i]; records the mode it was called in."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.called_in_training = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.called_in_training = self.training
        return self.table[x[:, 0].long()]


class Identity(nn.Module):
    """A feature "extractor" whose penultimate features are the inputs themselves."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None]


# Source classes 0..4. Votes: class 2 x3, classes 0 and 4 x2 each, classes 1 and 3 none.
# Class 0 wins its rows with logit 9 (prob ~1), class 4 with logit 2, so the 0/4 vote tie goes
# to class 0 by softmax mass; class 3 carries logit 1 everywhere and class 1 logit 0, so among
# the zero-vote classes 3 ranks before 1 (class id order alone would say 1 first).
LM_TABLE = torch.tensor(
    [
        [0.0, 0.0, 5.0, 1.0, 0.0],
        [0.0, 0.0, 5.0, 1.0, 0.0],
        [0.0, 0.0, 5.0, 1.0, 0.0],
        [9.0, 0.0, 0.0, 1.0, 0.0],
        [9.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0, 2.0],
        [0.0, 0.0, 0.0, 1.0, 2.0],
    ]
)


def test_label_mapping_votes_and_tie_breaks():
    net = TableNet(LM_TABLE)
    sel = label_mapping(net, _rows(7), batch_size=3, device="cpu")
    assert sel.method == "lm"
    assert sel.votes.tolist() == [2, 0, 3, 0, 2]
    assert sel.ranking.tolist() == [2, 0, 4, 3, 1]
    assert sel.rank.tolist() == [1, 4, 0, 3, 2]
    assert torch.allclose(sel.scores, torch.tensor([2, 0, 3, 0, 2], dtype=torch.float64) / 7)
    assert torch.allclose(sel.details["softmax_mass"], LM_TABLE.double().softmax(1).mean(0))
    assert net.called_in_training is False and net.training  # evaluated in eval mode, mode restored


def test_label_mapping_is_deterministic_across_batch_sizes():
    x = _rows(7)
    a = label_mapping(TableNet(LM_TABLE), x, batch_size=1, device="cpu")
    b = label_mapping(TableNet(LM_TABLE), x, batch_size=1024, device="cpu")
    assert torch.equal(a.ranking, b.ranking) and torch.equal(a.votes, b.votes)
    assert torch.allclose(a.details["softmax_mass"], b.details["softmax_mass"])


def test_soft_label_mapping_ranks_by_probability_mass():
    # Class 1 is never the argmax but is the runner-up everywhere: it has the most mass.
    table = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.9, 0.0], [0.0, 0.9, 1.0]])
    hard = label_mapping(TableNet(table), _rows(3), device="cpu")
    soft = label_mapping(TableNet(table), _rows(3), device="cpu", soft=True)
    assert hard.ranking.tolist() == [0, 2, 1]
    assert soft.method == "lm_soft" and soft.ranking.tolist() == [1, 0, 2]
    assert torch.allclose(soft.scores, table.double().softmax(1).mean(0))


def test_k_and_ratio_bounds():
    sel = label_mapping(TableNet(LM_TABLE), _rows(7), device="cpu")
    for k in (0, 6):
        with pytest.raises(ValueError, match=r"k must be in 1\.\.5"):
            sel.top_k(k)
        with pytest.raises(ValueError, match=r"k must be in 1\.\.5"):
            sel.bottom_k(k)
    with pytest.raises(ValueError, match=r"pruning ratio must be in \[0, 1\)"):
        sel.kept_classes(1.0)
    assert sel.top_k(2).tolist() == [2, 0]
    assert sel.bottom_k(2).tolist() == [1, 3]
    # Pruning 50% of 5 classes keeps 3 (rounding never prunes more than asked); 0.7 of 10 keeps 3.
    assert sel.kept_classes(0.5).tolist() == [0, 2, 4]
    assert sel.kept_classes(0.5, reverse=True).tolist() == [1, 3, 4]
    assert sel.kept_classes(0.0).tolist() == [0, 1, 2, 3, 4]
    ten = ClassSelection(torch.zeros(10), torch.zeros(10, dtype=torch.long), torch.arange(10), "x")
    assert ten.num_kept(0.7) == 3 and ten.num_kept(0.9) == 1
    labels = torch.tensor([0, 1, 2, 3, 4, 2, 0])
    assert sel.kept_samples(0.5, labels).tolist() == [0, 2, 4, 5, 6]


def test_class_selection_validates_its_fields():
    with pytest.raises(ValueError, match="permutation"):
        ClassSelection(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1]), "x")
    with pytest.raises(ValueError, match="one length"):
        ClassSelection(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.arange(3), "x")


def test_unknown_selector_lists_the_registry():
    with pytest.raises(ValueError, match="unknown selector 'nope'; valid: lm, lm_soft, fm, fm_kmeans, random"):
        get_selector("nope")
    with pytest.raises(ValueError, match="needs surrogate, target_x"):
        select_classes("lm", SelectionInputs(num_classes=3))


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_selector_scores_every_class(name):
    g = torch.Generator().manual_seed(0)
    net = create_net("convnet", num_classes=4, channels=3, image_size=8, width=4, depth=1)
    inputs = SelectionInputs(
        num_classes=4,
        surrogate=net,
        target_x=torch.randn(10, 3, 8, 8, generator=g),
        source_x=torch.randn(24, 3, 8, 8, generator=g),
        source_y=torch.arange(24) % 4,
        device="cpu",
    )
    a, b = select_classes(name, inputs), select_classes(name, inputs)
    assert a.num_classes == 4 and torch.equal(a.ranking, b.ranking)  # deterministic given the inputs
    assert int(a.votes.sum()) in (0, 10)  # random has no votes; the others one per target image


# ---------------------------------------------------------------- feature mapping

# Group 1 is far from everything and group 4 near the targets; neither gets votes, so the
# mean-distance tie-break puts 4 before 1 (id order would not).
CENTRES = torch.tensor([[0.0, 0.0], [100.0, 100.0], [0.0, 10.0], [10.0, 10.0], [10.0, 0.0]])
TARGET_BLOBS = [2] * 5 + [0] * 3 + [3]


def _blobs(groups: list[int], seed: int, spread: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return CENTRES[groups] + spread * torch.randn(len(groups), 2, generator=g)


def _source() -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(5).repeat(20)
    return _blobs(labels.tolist(), seed=0), labels


def test_feature_mapping_votes_for_the_nearest_class_centroid():
    source_x, source_y = _source()
    sel = feature_mapping(Identity(), source_x, source_y, _blobs(TARGET_BLOBS, seed=1), device="cpu")
    assert sel.method == "fm"
    assert sel.votes.tolist() == [3, 0, 5, 1, 0]
    assert sel.ranking.tolist() == [2, 0, 3, 4, 1]
    assert sel.details["group_size"].tolist() == [20] * 5


def _reference_fm_votes(target: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """fm_selection_for_imagenet.py as written: every key's distance lands in entry i (brief 1.5.1)."""
    votes = torch.zeros(len(centroids), dtype=torch.long)
    for i, f in enumerate(target):  # all targets of one target class: i is the index within the class
        distance_score = torch.zeros(len(centroids))
        for key in range(len(centroids)):
            distance_score[i] = torch.dist(f, centroids[key])
        votes[distance_score.argmin()] += 1
    return votes


def test_feature_mapping_fixes_the_reference_overwrite_bug():
    source_x, source_y = _source()
    target = _blobs([2] * 5, seed=2)  # every target image sits on source class 2
    centroids = torch.stack([source_x[source_y == c].mean(0) for c in range(5)])
    assert _reference_fm_votes(target, centroids).tolist() == [4, 1, 0, 0, 0]  # the bug: votes for 0 and 1
    sel = feature_mapping(Identity(), source_x, source_y, target, device="cpu")
    assert sel.votes.tolist() == [0, 0, 5, 0, 0] and int(sel.ranking[0]) == 2


def test_nearest_centroid_matches_brute_force_in_blocks(monkeypatch):
    monkeypatch.setattr(selection_module, "_DISTANCE_ROWS", 7)  # several blocks, one ragged
    g = torch.Generator().manual_seed(3)
    target, centroids = torch.randn(50, 6, generator=g), torch.randn(9, 6, generator=g)
    nearest, votes, mean_distance = nearest_centroid_votes(target, centroids)
    full = ((target[:, None, :] - centroids[None]) ** 2).sum(-1).sqrt()
    assert torch.equal(nearest, full.argmin(1))
    assert torch.equal(votes, torch.bincount(full.argmin(1), minlength=9))
    assert torch.allclose(mean_distance, full.double().mean(0), atol=1e-6)


def test_feature_mapping_with_a_class_absent_from_the_source():
    source_x, source_y = _source()
    sel = feature_mapping(Identity(), source_x, source_y, _blobs(TARGET_BLOBS, 1), num_classes=6, device="cpu")
    assert sel.num_classes == 6 and int(sel.votes[5]) == 0 and int(sel.ranking[-1]) == 5
    assert sel.details["mean_distance"][5] == float("inf")


def test_kmeans_feature_mapping_recovers_the_blobs():
    source_x, source_y = _source()
    sel = feature_mapping(Identity(), source_x, None, _blobs(TARGET_BLOBS, seed=1), k_clusters=5, seed=0, device="cpu")
    clusters = sel.details["cluster_of_sample"]
    assert sel.method == "fm_kmeans" and clusters.shape == (100,)
    # The clustering equals the true blobs up to a permutation of ids.
    blob_to_cluster = {int(b): set(clusters[source_y == b].tolist()) for b in range(5)}
    assert all(len(ids) == 1 for ids in blob_to_cluster.values())
    cluster_of = {b: ids.pop() for b, ids in blob_to_cluster.items()}
    assert len(set(cluster_of.values())) == 5
    assert [int(sel.votes[cluster_of[b]]) for b in range(5)] == [3, 0, 5, 1, 0]
    assert int(sel.ranking[0]) == cluster_of[2]
    # Pruning 60% keeps the clusters of blobs 2 and 0: their 40 source samples.
    kept = sel.kept_samples(0.6)
    assert sorted(set(source_y[kept].tolist())) == [0, 2] and len(kept) == 40


def test_feature_mapping_group_arguments_are_exclusive():
    source_x, source_y = _source()
    target = _blobs(TARGET_BLOBS, seed=1)
    with pytest.raises(ValueError, match="needs k_clusters"):
        feature_mapping(Identity(), source_x, None, target)
    with pytest.raises(ValueError, match="not both"):
        feature_mapping(Identity(), source_x, source_y, target, k_clusters=5)
    with pytest.raises(ValueError, match=r"k_clusters must be in 1\.\.100"):
        feature_mapping(Identity(), source_x, None, target, k_clusters=101)


# ---------------------------------------------------------------- formats


FEATURES = {"layer": "penultimate", "resolution": 32, "augmentation": "none"}


def test_selection_round_trip_and_datasets_compatibility(tmp_path, hf_datasets):
    sel = label_mapping(TableNet(LM_TABLE), _rows(7), device="cpu")
    path = str(tmp_path / "sel" / "selection.parquet")
    names = ["apple", "bear", "cat", "dog", "eel"]
    assert write_selection(path, sel, class_names=names, surrogate_fingerprint="abc123", feature_settings=FEATURES) == 5
    back, back_names, meta = read_selection(path)
    assert back_names == names and back.method == "lm"
    assert torch.equal(back.ranking, sel.ranking) and torch.equal(back.votes, sel.votes)
    assert torch.equal(back.scores, sel.scores)
    assert torch.allclose(back.details["softmax_mass"], sel.details["softmax_mass"])
    assert back.details["num_target"] == 7
    assert meta["surrogate_fingerprint"] == "abc123" and meta["features"] == FEATURES

    datasets, cache = hf_datasets
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache)
    assert ds.column_names[:6] == ["class", "name", "score", "votes", "rank", "method"]
    assert ds["rank"] == sel.rank.tolist() and ds["name"] == names


def test_clustered_selection_round_trip(tmp_path):
    source_x, _ = _source()
    sel = feature_mapping(Identity(), source_x, None, _blobs(TARGET_BLOBS, 1), k_clusters=5, device="cpu")
    path = str(tmp_path / "fm.parquet")
    write_selection(path, sel, feature_settings=FEATURES)
    back, names, meta = read_selection(path)
    assert names == [f"cluster_{i}" for i in range(5)] and back.method == "fm_kmeans"
    assert back.details["group_size"].dtype == torch.int64
    assert torch.equal(back.details["group_size"], sel.details["group_size"])
    assert torch.equal(back.details["mean_distance"], sel.details["mean_distance"])
    assert "cluster_of_sample" not in back.details and meta["details"]["kmeans_seed"] == 0
    with pytest.raises(ValueError, match="reserved keys"):
        write_selection(path, sel, extra_metadata={"format": "other"})


def test_kept_round_trip_and_datasets_compatibility(tmp_path, hf_datasets):
    source_x, source_y = _source()
    sel = feature_mapping(Identity(), source_x, source_y, _blobs(TARGET_BLOBS, 1), device="cpu")
    rows = [
        KeptSamples.from_selection(sel, 0.6, seed=0, labels=source_y),
        KeptSamples.from_selection(sel, 0.6, seed=0, labels=source_y, reverse=True),
        KeptSamples("moderate", 0.6, 0, moderate_samples(source_x, source_y, 40, seed=0).tolist()),
    ]
    path = str(tmp_path / "kept.parquet")
    assert write_kept(path, rows, num_source_samples=100) == 3
    back = read_kept(path)
    assert back == rows
    assert back[0].kept_classes == [0, 2] and back[1].method == "fm_reverse" and back[1].kept_classes == [1, 4]
    assert back[2].kept_classes is None and len(back[2].kept) == 40

    datasets, cache = hf_datasets
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache)
    assert ds["num_kept_samples"] == [40, 40, 40] and ds["kept"][0] == rows[0].kept


def test_readers_raise_format_errors_naming_the_file(tmp_path):
    sel = label_mapping(TableNet(LM_TABLE), _rows(7), device="cpu")
    path = tmp_path / "selection.parquet"
    write_selection(str(path), sel)
    with pytest.raises(FormatError, match="selection.parquet: is a 'selection' file, expected 'selection_kept'"):
        read_kept(str(path))
    table = pq.read_table(path)
    tied = table.set_column(4, "rank", pa.array([0] * 5, pa.int64())).replace_schema_metadata(table.schema.metadata)
    pq.write_table(tied, tmp_path / "tied.parquet")
    with pytest.raises(FormatError, match=r"tied.parquet: `rank` is not a permutation of 0\.\.4"):
        read_selection(str(tmp_path / "tied.parquet"))
    pq.write_table(table.drop(["votes"]).replace_schema_metadata(table.schema.metadata), tmp_path / "novotes.parquet")
    with pytest.raises(FormatError, match=r"novotes.parquet: missing column\(s\) \['votes'\]"):
        read_selection(str(tmp_path / "novotes.parquet"))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(FormatError, match="selection.parquet: not a readable Parquet file"):
        read_selection(str(path))
    with pytest.raises(FormatError, match="no such file"):
        read_selection(str(tmp_path / "missing.parquet"))

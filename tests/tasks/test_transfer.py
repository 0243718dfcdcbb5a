"""Stages pretrain / transfer as plain functions: stored weights, cost columns, caching, resize, the report."""

from __future__ import annotations

import pytest
import torch

from distill.data import DataConfig, DataError
from distill.train import TrainConfig
from distill.transfer import TransferConfig
from tasks.datasets import materialize_dataset, preprocessed
from tasks.transfer import (
    FULL,
    SCRATCH,
    accuracy_plot,
    load_pretrained,
    pretrain_weights,
    summarize_rows,
    transfer_eval,
)
from tests.tasks.prune_world import materialize_world, write_world

# One recipe (distill.transfer): the net and pretraining, then how the backbone is judged.
TRANSFER = TransferConfig(
    net_kwargs={"width": 8, "depth": 1},
    pretrain=TrainConfig(epochs=3, batch_size=32, lr=0.05, schedule="cosine", augment="flip_crop"),
    linear_probe=TrainConfig(epochs=5, batch_size=16, lr=0.01, optimizer="adam", weight_decay=0, augment="none"),
    fine_tune=TrainConfig(epochs=2, batch_size=16, lr=1e-3, optimizer="adam", weight_decay=0),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer-world")
    store = str(root / "store")
    source, target = materialize_world(root, store)
    return store, source, target, root


def test_pretrain_stores_weights_and_cost_and_is_reused(world):
    store, source, *_ = world
    ref = pretrain_weights.fn(source, TRANSFER, 0, store, "full")
    manifest = ref.open().manifest
    assert manifest["train_images"] == 180 and manifest["images_seen"] == 3 * 180
    assert manifest["pretrain_seconds"] > 0 and 0 <= manifest["pretrain_train_acc"] <= 1
    net, info = load_pretrained(ref)
    x, _, _ = preprocessed(source, "test")
    again = pretrain_weights.fn(source, TRANSFER, 0, store, "full")
    assert again == ref and again.open().manifest["created_at"] == manifest["created_at"]
    assert torch.equal(net(x), load_pretrained(again)[0](x)), "reloaded weights give the same outputs"
    assert pretrain_weights.fn(source, TRANSFER, 1, store) != ref, "the seed names a different run"


def test_transfer_from_pretrained_and_from_scratch(world):
    store, source, target, _ = world
    ref = pretrain_weights.fn(source, TRANSFER, 0, store, "full")
    row = transfer_eval.fn(ref, target, TRANSFER, 0, store, "full")
    assert 0 <= row["linear_probe_acc"] <= 1 and 0 <= row["fine_tune_acc"] <= 1
    assert row["images_seen"] == 540 and row["target_train_images"] == 24  # 16x16 target resized to 8x8
    assert transfer_eval.fn(ref, target, TRANSFER, 0, store, "full") == row
    scratch = transfer_eval.fn(None, target, TRANSFER, 0, store, SCRATCH)
    assert scratch["images_seen"] == 0 and scratch["pretrain_seconds"] == 0.0
    assert scratch["transfer_key"] != row["transfer_key"]
    lp_only = transfer_eval.fn(ref, target, TRANSFER.model_copy(update={"modes": ["linear_probe"]}), 0, store)
    assert "fine_tune_acc" not in lp_only
    assert lp_only["linear_probe_acc"] == row["linear_probe_acc"], "the probe is seeded and independent of ft"
    probe = TRANSFER.model_copy(update={"linear_probe": TRANSFER.linear_probe.model_copy(update={"epochs": 6})})
    other = transfer_eval.fn(pretrain_weights.fn(source, probe, 0, store, "full"), target, probe, 0, store)
    assert other["transfer_key"] != row["transfer_key"] and other["images_seen"] == row["images_seen"]
    assert pretrain_weights.fn(source, probe, 0, store) == ref, "a new probe recipe reuses the pretrained weights"


def test_zca_target_of_another_size_is_refused(world):
    store, source, _, root = world
    (root / "zca").mkdir(exist_ok=True)
    _, target_npz = write_world(root / "zca")
    zca_target = materialize_dataset.fn(DataConfig(source=str(target_npz), image_size=None, zca=True), store)
    ref = pretrain_weights.fn(source, TRANSFER, 0, store)
    with pytest.raises(DataError, match=r"target images are \[3, 16, 16\] but the backbone takes \[3, 8, 8\]"):
        transfer_eval.fn(ref, zca_target, TRANSFER, 0, store)


def test_summary_and_plot():
    rows = [
        {
            "method": m,
            "ratio": r,
            "seed": s,
            "linear_probe_acc": acc + 0.01 * s,
            "fine_tune_acc": acc,
            "pretrain_seconds": secs,
            "train_images": 10,
            "images_seen": 30,
        }
        for m, r, acc, secs in (
            (FULL, 0.0, 0.8, 10.0),
            (SCRATCH, 0.0, 0.5, 0.0),
            ("lm", 0.5, 0.79, 5.0),
            ("random", 0.5, 0.7, 5.0),
        )
        for s in range(3)
    ]
    summary = summarize_rows(rows)
    lm = next(s for s in summary if s["method"] == "lm")
    assert lm["seeds"] == 3 and lm["linear_probe_acc_mean"] == pytest.approx(0.80)
    assert lm["linear_probe_acc_std"] == pytest.approx(0.01)
    assert lm["pretrain_time_vs_full"] == pytest.approx(0.5)
    assert accuracy_plot(summary)[:4] == b"\x89PNG"


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown net 'vgg'; valid: convnet"):
        TransferConfig(net="vgg")
    with pytest.raises(ValueError):
        TransferConfig(modes=["probe"])
    with pytest.raises(ValueError):
        TransferConfig(modes=[])

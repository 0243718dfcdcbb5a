"""Tests for distill.evaluate's summaries and distill.utils' peak-memory readers."""

import math
import resource

import pytest
import torch

from distill.evaluate import summarize, summarize_groups
from distill.utils import peak_memory_mb, peak_rss_mb

ROWS = [
    {"method": "tm", "setting": "ipc1", "test_acc": 0.30, "lp": None},
    {"method": "random", "setting": "ipc1", "test_acc": 0.20, "lp": 0.5},
    {"method": "tm", "setting": "ipc1", "test_acc": 0.34, "lp": None},
    {"method": "tm", "setting": "ipc10", "test_acc": 0.50},
]


def test_summarize_is_mean_and_sample_std():
    s = summarize([0.30, 0.34])
    assert s["mean"] == pytest.approx(0.32) and s["std"] == pytest.approx(math.sqrt(0.0008)) and s["n"] == 2
    assert summarize([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert math.isnan(summarize([])["mean"])


def test_groups_come_in_first_seen_order_with_mean_std_and_seeds():
    out = summarize_groups(ROWS, ["method", "setting"], ["test_acc", "lp"])
    assert [(r["method"], r["setting"], r["seeds"]) for r in out] == [
        ("tm", "ipc1", 2),
        ("random", "ipc1", 1),
        ("tm", "ipc10", 1),
    ]
    tm = out[0]
    assert tm["test_acc_mean"] == pytest.approx(0.32) and tm["test_acc_std"] == pytest.approx(math.sqrt(0.0008))
    assert "lp_mean" not in tm, "a metric no row of the group has gets no columns"
    assert out[1]["lp_mean"] == 0.5 and out[1]["lp_std"] == 0.0


def test_groups_can_be_sorted():
    out = summarize_groups(ROWS, ["method"], ["test_acc"], sort_key=lambda key: key[0])
    assert [r["method"] for r in out] == ["random", "tm"] and out[1]["seeds"] == 3


def test_peak_memory_readers():
    rss = peak_rss_mb()
    assert rss == round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1) and rss > 10
    assert peak_memory_mb(torch.device("cpu")) == peak_rss_mb()

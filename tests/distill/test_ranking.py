"""DD-Ranking scores (distill.ranking): the formulas, and which accuracies a set is scored against."""

from __future__ import annotations

import math

import pytest

from distill.ranking import LRS_NEUTRAL, lrs, ranking_rows, scores


def test_lrs_maps_a_onto_0_to_1_and_is_neutral_when_the_images_add_what_they_lose():
    assert lrs(0.2, 0.2) == pytest.approx(LRS_NEUTRAL) == pytest.approx(0.2689, abs=1e-4)
    # a = (IOR - HLR) / 2 in [-1, 1] maps onto [0, 1]
    assert lrs(1.0, -1.0) == pytest.approx(0.0) and lrs(-1.0, 1.0) == pytest.approx(1.0)
    a = 0.5 * 0.3 - 0.5 * 0.1
    assert lrs(0.1, 0.3) == pytest.approx((math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1)))


def test_scores_follow_the_definitions():
    s = scores(real_hard=0.6, set_hard=0.3, set_own=0.35, random_own=0.15)
    assert s["hlr"] == pytest.approx(0.3) and s["ior"] == pytest.approx(0.2)
    assert s["lrs"] == pytest.approx(lrs(0.3, 0.2)) and s["lrs"] < LRS_NEUTRAL


def _row(method, setting, labels, acc):
    return {"method": method, "setting": setting, "labels": labels, "test_acc_mean": acc}


def test_a_soft_label_set_is_compared_with_random_images_on_soft_labels():
    summary = [
        _row("full-real", "full/convnet", "hard", 0.6),
        _row("random-real", "ipc1/convnet", "hard", 0.15),
        _row("random-real", "ipc1/convnet", "soft", 0.25),
        _row("tm-mtt", "ipc1/convnet", "hard", 0.3),
        _row("tm-mtt+soft", "ipc1/convnet", "hard", 0.28),
        _row("tm-mtt+soft", "ipc1/convnet", "soft", 0.33),
    ]
    rows = {r["method"]: r for r in ranking_rows(summary, "random-real")}
    assert set(rows) == {"tm-mtt", "tm-mtt+soft"}
    hard, soft = rows["tm-mtt"], rows["tm-mtt+soft"]
    assert hard["own_labels"] == "hard" and hard["ior"] == pytest.approx(0.15) and hard["hlr"] == pytest.approx(0.3)
    assert soft["own_labels"] == "soft" and soft["ior"] == pytest.approx(0.08) and soft["hlr"] == pytest.approx(0.32)
    assert soft["missing"] == "" and soft["random_own"] == 0.25


def test_a_set_without_its_references_is_not_scored_and_says_why():
    summary = [_row("random-real", "ipc10/resnet18", "hard", 0.2), _row("tm-ast", "ipc10/resnet18", "hard", 0.3)]
    (row,) = ranking_rows(summary, "random-real")
    assert row["lrs"] is None and row["hlr"] is None and row["missing"] == "full real (hard)"
    # rows written before label kinds existed count as hard
    old = [{"method": "tm-mtt", "setting": "ipc1/convnet", "test_acc_mean": 0.3}]
    (row,) = ranking_rows(old, "random-real")
    assert row["own_labels"] == "hard" and "random real (hard)" in row["missing"]

"""DD-Ranking scores: how much of a distilled set's accuracy its images earn, beyond its labels.

"A Label is Worth a Thousand Images in Dataset Distillation" (Qin et al., NeurIPS 2024) shows
that random real images trained on a teacher's soft labels already rival many distilled sets,
so accuracy alone credits the labels to the images. "DD-Ranking: Rethinking the Evaluation of
Dataset Distillation" (2025) scores a distilled set with:

- HLR (hard label recovery) = acc(full real, hard) - acc(set, hard): the gap the images leave
  when both are trained on hard labels (lower is better);
- IOR (improvement over random) = acc(set, own labels) - acc(random real, the same kind of
  labels): what the images add over random real images with the set's own kind of labels
  (soft labels: an expert's logits on the random images; higher is better);
- LRS (label-robust score) = (e^a - e^-1) / (e - e^-1) with a = (IOR - HLR) / 2: a in [-1, 1]
  maps onto [0, 1], higher is better; IOR = HLR (a = 0) gives (1 - e^-1) / (e - e^-1) = 0.269.

Accuracies are fractions. `ranking_rows` turns a metrics summary (one row per method, setting
and label kind, as `tasks.evaluation.summary_rows` writes it) into one score row per distilled
set, from the means over seeds.
"""

from __future__ import annotations

import math
from typing import Any

FULL_REAL = "full-real"  # method name of the full real training set in metrics tables
HARD, SOFT = "hard", "soft"  # the labels a set was trained on: class indices, or the set's soft labels
LRS_NEUTRAL = (1 - math.exp(-1)) / (math.e - math.exp(-1))  # the score of a = 0 (IOR = HLR), about 0.269


def lrs(hlr: float, ior: float) -> float:
    """Label-robust score from HLR and IOR (fractions); LRS_NEUTRAL when IOR = HLR."""
    a = 0.5 * ior - 0.5 * hlr
    return (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))


def scores(real_hard: float, set_hard: float, set_own: float, random_own: float) -> dict[str, float]:
    """HLR, IOR and LRS from four accuracies (fractions), as defined in the module docstring."""
    hlr = real_hard - set_hard
    ior = set_own - random_own
    return {"hlr": hlr, "ior": ior, "lrs": lrs(hlr, ior)}


def net_of(setting: str) -> str:
    """The architecture of a setting (`ipc10/convnet` -> `convnet`)."""
    return setting.rsplit("/", 1)[-1]


def full_setting(net: str) -> str:
    """The setting column of the full real training set's rows."""
    return f"full/{net}"


def ranking_rows(summary: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """One row per distilled (method, setting): its HLR, IOR and LRS and the accuracies behind them.

    summary: rows with method, setting, labels (hard/soft; missing = hard) and test_acc_mean.
    baseline: the method name of the random real subsets. A set is scored only when the full real
    accuracy for its net, its own hard-label accuracy and the random baseline with its kind of
    labels are all present; otherwise the row names what is missing, with null scores.
    """
    acc = {(r["method"], r["setting"], r.get("labels") or HARD): r["test_acc_mean"] for r in summary}
    methods = sorted({(m, s) for m, s, _ in acc if m not in (baseline, FULL_REAL)})
    rows = []
    for method, setting in methods:
        own = SOFT if (method, setting, SOFT) in acc else HARD
        need = {
            "full real (hard)": acc.get((FULL_REAL, full_setting(net_of(setting)), HARD)),
            "set (hard)": acc.get((method, setting, HARD)),
            f"set ({own})": acc.get((method, setting, own)),
            f"random real ({own})": acc.get((baseline, setting, own)),
        }
        row: dict[str, Any] = {"method": method, "setting": setting, "own_labels": own}
        missing = [k for k, v in need.items() if v is None]
        if missing:
            row.update(hlr=None, ior=None, lrs=None, missing=", ".join(missing))
        else:
            row.update(
                scores(
                    need["full real (hard)"], need["set (hard)"], need[f"set ({own})"], need[f"random real ({own})"]
                ),
                missing="",
            )
        row.update(
            real_hard=need["full real (hard)"],
            set_hard=need["set (hard)"],
            set_own=need[f"set ({own})"],
            random_own=need[f"random real ({own})"],
        )
        rows.append(row)
    return rows

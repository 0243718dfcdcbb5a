"""The per-path report: percentages with one decimal, no empty accuracy columns, verdicts with spreads."""

from __future__ import annotations

from tasks.tables import path_report, pct, pct_diff, verdict


def _row(path, method, kind, **acc):
    return {
        "path": path,
        "method": method,
        "kind": kind,
        "seeds": 3,
        "data_mib": 1.0,
        "wall_s": 10.0,
        "peak_rss_mb": None,
        **acc,
    }


def test_pct_and_verdict():
    assert pct(0.4321, 0.0071) == "43.2 +- 0.7" and pct(None) == "-"
    m = {"method": "krr-st", "linear_probe_acc_mean": 0.45, "linear_probe_acc_std": 0.01}
    b = {"method": "step-0", "linear_probe_acc_mean": 0.44, "linear_probe_acc_std": 0.01}
    assert verdict(m, b, "linear_probe_acc") == "+1.0 +- 1.4 points over step-0: no clear gain (within the spread)"
    b["linear_probe_acc_mean"] = 0.40
    assert verdict(m, b, "linear_probe_acc").endswith(": gain")
    b["linear_probe_acc_mean"] = 0.50
    assert verdict(m, b, "linear_probe_acc").endswith(": loss")
    assert pct_diff(m, b, "linear_probe_acc") == "-5.0 +- 1.4" and pct_diff(m, {}, "linear_probe_acc") == "-"


def test_one_table_per_path_without_empty_accuracy_cells():
    rows = [
        _row("transfer", "krr-st", "method", linear_probe_acc_mean=0.45, linear_probe_acc_std=0.01, test_acc_mean=None),
        _row("transfer", "no-pretrain", "baseline", linear_probe_acc_mean=0.30, linear_probe_acc_std=0.01),
        _row("tm", "tm-mtt", "method", test_acc_mean=0.30, test_acc_std=0.01),
        _row("tm", "random-real", "baseline", test_acc_mean=0.15, test_acc_std=0.01),
    ]
    text = path_report(rows)
    transfer, tm = text.split("### tm")
    assert "linear probe" in transfer and "test accuracy" not in transfer and "None" not in text
    assert "test accuracy" in tm and "linear probe" not in tm
    assert "| krr-st | method | 45.0 +- 1.0 |" in transfer
    assert "- krr-st, linear probe: +15.0 +- 1.4 points over no-pretrain: gain" in transfer
    assert "- tm-mtt, test accuracy: +15.0 +- 1.4 points over random-real: gain" in tm

"""Flows `prune` and `prune-eval` in-process against the session's Prefect server and local Ray (tiny presets)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distill.formats import read_metrics
from dp4tl.formats import read_kept, read_selection
from flows.presets import load_preset, presets
from flows.prune import PruneConfig, PruneEvalConfig, _check_against_data, prune, prune_eval
from tests.conftest import data_path


@pytest.mark.parametrize("flow_name", ["prune", "prune-eval"])
def test_every_preset_is_a_valid_config(flow_name):
    model = PruneConfig if flow_name == "prune" else PruneEvalConfig
    for preset in presets(flow_name):
        cfg = model(**load_preset(flow_name, preset))
        methods = set(cfg.selection.methods)
        assert {"lm", "random", "lm_bottom"} <= methods and {"fm", "fm_kmeans"} & methods  # FM by labels or K-means


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"selection": {"ratios": [1.0]}}, "strictly between 0 and 1"),
        ({"selection": {"ratios": [0.0]}}, "strictly between 0 and 1"),
        ({"selection": {"methods": ["best"]}}, "unknown pruning method 'best'; valid: lm, lm_soft, fm, fm_kmeans"),
        ({"selection": {"methods": ["lm", "lm"]}}, "distinct"),
        (
            {"selection": {"resize_target": False}, "target": {"source": "x", "image_size": 64}},
            "resize_target is false",
        ),
        ({"surrogate": {"net": "vgg"}}, "(registered nets|valid): convnet"),
        ({"transfer": {"net_kwargs": {"wdith": 8}}}, "unknown argument"),
    ],
)
def test_bad_parameters_are_refused(change, message):
    base = load_preset("prune-eval", "tiny")
    merged = {**base, **{k: {**base.get(k, {}), **v} for k, v in change.items()}}
    with pytest.raises(ValidationError, match=message):
        PruneEvalConfig(**merged)


def test_data_dependent_errors_are_found_from_labels_alone(prefect_server, tmp_path):
    """The flows run this check first, in the flow process, before any dataset is decoded."""
    data_path("tiny-imagenet-200", "train.parquet")
    base = {**load_preset("prune", "tiny"), "store": str(tmp_path)}
    # 10 source classes: pruning 5% keeps all 10, so nothing would be pruned.
    with pytest.raises(ValueError, match="prunes no class of 10"):
        _check_against_data(PruneConfig(**{**base, "selection": {**base["selection"], "ratios": [0.05]}}))
    with pytest.raises(ValueError, match="k_clusters=500 is larger than the 200 source samples"):
        _check_against_data(
            PruneConfig(**{**base, "selection": {**base["selection"], "methods": ["fm_kmeans"], "k_clusters": 500}})
        )


@pytest.mark.integration
def test_prune_eval_tiny_selects_pretrains_reports_and_reuses(prefect_server, tmp_path):
    data_path("tiny-imagenet-200", "train.parquet")
    data_path("cifar10", "train.parquet")
    selected = prune(PruneConfig(**{**load_preset("prune", "tiny"), "store": str(tmp_path)}))
    cfg = PruneEvalConfig(**{**load_preset("prune-eval", "tiny"), "store": str(tmp_path)})
    result = prune_eval(cfg)
    assert result["selections"] == selected["selections"], "prune-eval reuses the selections of prune"

    selections = sorted(p for p in (tmp_path / "selection").iterdir() if (p / "manifest.json").exists())
    assert len(selections) == 4  # lm, fm, random, lm_bottom at seed 0
    for d in selections:
        kept = read_kept(str(d / "kept.parquet"))
        assert [r.ratio for r in kept] == [0.5] and len(kept[0].kept_classes) == 5
        selection, names, meta = read_selection(str(d / "selection.parquet"))
        assert selection.num_classes == 10 and meta["surrogate_fingerprint"] and len(set(names)) == 10

    rows = result["rows"]
    assert sorted({r["method"] for r in rows}) == ["fm", "full", "lm", "lm_bottom", "random", "scratch"]
    for r in rows:
        assert 0 <= r["linear_probe_acc"] <= 1 and 0 <= r["fine_tune_acc"] <= 1
    full = next(r for r in rows if r["method"] == "full")
    pruned = [r for r in rows if r["method"] not in ("full", "scratch")]
    assert all(r["images_seen"] == full["images_seen"] // 2 for r in pruned), "50% of 10 equal classes"
    metrics = tmp_path / "transfer-metrics" / result["metrics_uri"].rsplit("/", 1)[-1]
    assert (metrics / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert len(read_metrics(str(metrics / "metrics.parquet"))) == 6
    assert {s["method"] for s in read_metrics(str(metrics / "summary.parquet"))} >= {"full", "scratch", "lm"}

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert {
        "prune-tiny-imagenet-200-to-cifar10-classes",
        "prune-eval-tiny-imagenet-200-to-cifar10-plot",
        "prune-eval-tiny-imagenet-200-to-cifar10-summary",
    } <= keys

    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if ".work" not in p.parts}
    again = prune_eval(cfg)
    assert again["summary"] == result["summary"], "a re-run reuses every stage"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if ".work" not in p.parts} == before

"""The `@stage` decorator: key, hit shortcut, typed manifest, work directory, retries; and the store keys
every stage computes, pinned to the values the hand-written tasks computed before it (cache compatibility)."""

from __future__ import annotations

import itertools

import pytest
from prefect import flow

from distill.data import DataConfig
from distill.evaluate import EvalConfig
from tasks.artifacts import ArtifactRef
from tasks.stage import Key, Manifest, Publish, RowsInfo, StageInfo, StageRun, stage, stage_key
from tasks.store import ArtifactStore, artifact_key

CALLS: list[str] = []


class ToyInfo(StageInfo):
    rows: int
    total: int
    note: str | None = None


def toy_key(values: list[int], upstream: ArtifactRef) -> Key:
    return Key({"values": values}, [upstream.key])


@stage("toy", key=toy_key, task_name="toy-sum")
def toy(values: list[int], upstream: ArtifactRef, store: str, run: StageRun, scale: int = 1) -> Publish:
    CALLS.append(run.key)
    work = run.work_dir()
    (work / "partial.txt").write_text("half done")

    def write(staging) -> ToyInfo:
        with staging.fs.open_output_stream(staging.file("sum.txt")) as f:
            f.write(str(sum(values) * scale).encode())
        return ToyInfo(rows=len(values), total=sum(values) * scale)

    return Publish(write, seeds={"toy": 0})


@pytest.fixture
def upstream(tmp_path) -> ArtifactRef:
    return ArtifactRef(store=str(tmp_path), stage="dataset", key="0123456789abcdef")


def test_a_miss_runs_the_body_and_publishes_a_typed_manifest_that_names_its_key(tmp_path, upstream):
    CALLS.clear()
    ref = toy.fn([1, 2, 3], upstream, str(tmp_path))
    assert ref == ArtifactRef(store=str(tmp_path), stage="toy", key=CALLS[0])
    manifest = ArtifactStore(str(tmp_path)).manifest("toy", ref.key)
    # the manifest records exactly what the key hashes: anyone can recompute the key from it
    assert artifact_key("toy", manifest["config"], manifest["inputs"], manifest["format_version"]) == ref.key
    assert manifest["inputs"] == [upstream.key] and manifest["seeds"] == {"toy": 0}
    assert "note" not in manifest, "fields the writer did not set stay out of the manifest"
    assert ToyInfo.of(ref) == ToyInfo(rows=3, total=6) and RowsInfo.of(ref).rows == 3
    assert Manifest.of(ref).files["sum.txt"].bytes == 1 and Manifest.of(ref).cost_s() >= 0
    assert not (tmp_path / ".work" / "toy" / ref.key).exists(), "the work directory goes once published"
    assert stage_key(toy, values=[1, 2, 3], upstream=upstream) == ref.key


def test_a_hit_returns_at_once_and_other_parameters_do_not_change_the_key(tmp_path, upstream):
    CALLS.clear()
    first = toy.fn([4, 5], upstream, str(tmp_path))
    again = toy.fn([4, 5], upstream, str(tmp_path), scale=10)  # scale is not part of the key: same artifact
    assert again == first and len(CALLS) == 1
    assert toy.fn([4, 6], upstream, str(tmp_path)) != first and len(CALLS) == 2


def test_misdeclared_stages_are_refused_when_defined():
    with pytest.raises(TypeError, match=r"takes \['cfg'\], which are not parameters of the task; valid names"):
        stage("bad", key=lambda cfg: Key(cfg))(lambda values, store, run: None)
    with pytest.raises(TypeError, match="must take `store`"):
        stage("bad", key=lambda values: Key(values))(lambda values, run: None)


def test_a_writer_must_return_typed_manifest_fields(tmp_path):
    @stage("loose", key=lambda n: Key({"n": n}))
    def loose(n: int, store: str, run: StageRun) -> Publish:
        return Publish(lambda staging: {"rows": n})

    with pytest.raises(TypeError, match="returned dict, expected a StageInfo model"):
        loose.fn(1, str(tmp_path))
    assert ArtifactStore(str(tmp_path)).list("loose") == []


ATTEMPTS = itertools.count()


@stage("flaky", key=lambda kind: Key({"kind": kind}), retry_delay_s=0)
def flaky(kind: str, store: str, run: StageRun) -> Publish:
    next(ATTEMPTS)
    raise ValueError("bad input") if kind == "value" else OSError("lost the worker's disk")


@flow(name="stage-retries")
def _retries(kind: str, store: str) -> None:
    flaky(kind, store)


@pytest.mark.parametrize(("kind", "error", "attempts"), [("value", ValueError, 1), ("io", OSError, 2)])
def test_crashes_are_retried_once_and_bad_input_is_not(prefect_server, tmp_path, kind, error, attempts):
    global ATTEMPTS
    ATTEMPTS = itertools.count()
    with pytest.raises(error):
        _retries(kind, str(tmp_path))
    assert next(ATTEMPTS) == attempts


# ---------------------------------------------------------------- pinned keys
# Computed by the hand-written `_key_of` adapters before the tasks became @stage bodies
# (commit 366e12d); a config whose JSON changes must bump the format version instead.

EVAL = EvalConfig(net_kwargs={"width": 8, "depth": 1}, num_models=2)


def _refs(store: str) -> dict[str, ArtifactRef]:
    keys = {
        "dataset": "0123456789abcdef",
        "target": "fedcba9876543210",
        "experts": "1111111111111111",
        "distill-tm": "2222222222222222",
        "ssl-teacher": "3333333333333333",
        "krr-st": "4444444444444444",
        "surrogate": "5555555555555555",
        "pretrain": "6666666666666666",
    }
    return {
        name: ArtifactRef(store=store, stage="dataset" if name == "target" else name, key=key)
        for name, key in keys.items()
    }


def test_dataset_and_evaluation_keys_are_unchanged(tmp_path):
    from tasks.datasets import materialize_dataset
    from tasks.evaluation import evaluate_distilled, random_subset

    r = _refs(str(tmp_path))
    data = DataConfig(source="hub:nonexistent/never-on-disk", image_size=16, classes=[0, 1, 2], train_per_class=20)
    assert stage_key(materialize_dataset, data=data) == "ee10167472e6289a"
    assert stage_key(random_subset, dataset=r["dataset"], ipc=2, seed=1, eval=EVAL) == "b7562f609e5e92a7"
    assert (
        stage_key(evaluate_distilled, distilled=r["distill-tm"], dataset=r["dataset"], eval=EVAL, seed=3)
        == "0ba29e02a4302a60"
    )


def test_expert_and_trajectory_matching_keys_are_unchanged(tmp_path):
    from distill.experts import ExpertConfig
    from distill.matching import MatchConfig
    from tasks.experts import publish_experts, train_one_expert
    from tasks.matching import distill_tm, run_key

    r = _refs(str(tmp_path))
    experts = ExpertConfig(recipe="ast", net_kwargs={"width": 8, "depth": 1}, epochs=4, num_experts=2)
    assert stage_key(train_one_expert, dataset=r["dataset"], cfg=experts, expert_id=1) == "48ae236ee95f503b"
    assert stage_key(publish_experts, dataset=r["dataset"], cfg=experts) == "48ae236ee95f503b"
    match = MatchConfig(ipc=2, iterations=7, syn_steps=3, expert_epochs=1, max_start_epoch=2)
    assert stage_key(distill_tm, dataset=r["dataset"], experts=r["experts"], cfg=match, eval=EVAL) == "0d816fb6b786ae61"
    assert run_key(match, r["experts"], r["dataset"]) == "8217d4537f1df7f5"


def test_prefect_cache_keys_separate_tasks_and_result_parameters(tmp_path, upstream):
    @stage("toy", key=toy_key, publish=False, result=lambda ref, part: part, task_name="toy-part")
    def part(values: list[int], upstream: ArtifactRef, part: int, store: str, run: StageRun) -> int:
        return part

    store = str(tmp_path)
    cache_key = part.cache_key_fn
    params = {"values": [7], "upstream": upstream, "part": 0, "store": store}
    assert cache_key(None, params) is None, "offered only once the artifact exists"
    ref = toy.fn([7], upstream, store)
    own = toy.cache_key_fn(None, {"values": [7], "upstream": upstream, "store": store})
    first, second = cache_key(None, params), cache_key(None, {**params, "part": 1})
    assert own.startswith(f"toy-{ref.key}") and first.startswith(f"toy-{ref.key}")
    assert len({own, first, second}) == 3, "one artifact, three different task results"


def test_krr_keys_are_unchanged(tmp_path):
    from distill.krr import KRRConfig, krr_transfer
    from distill.ssl import SSLConfig
    from tasks.krr import distill_krr_st, evaluate_method, report_metrics, train_teacher_task

    r = _refs(str(tmp_path))
    transfer = krr_transfer()  # the KRR stage's default recipe (distill.transfer, issue 13)
    assert stage_key(train_teacher_task, source=r["dataset"], cfg=SSLConfig()) == "f7a02fc96f2c9a59"
    assert (
        stage_key(
            distill_krr_st,
            source=r["dataset"],
            teacher=r["ssl-teacher"],
            cfg=KRRConfig(num_images=12),
            transfer=transfer,
        )
        == "a60dfe960f1c2d42"
    )
    # Moved on purpose with the one transfer recipe (issue 13, 0980e3b: TransferConfig gained `modes` and the
    # shared probe/fine-tune recipes); before it: krr-st 26ec84634a2da720, random-real-targets 70c7775df545940c,
    # teacher 436b677de7be9e0d, no-pretrain 563ec5b4e903c47b.
    pinned = {
        "krr-st": "dd80c7d44fe75ecd",
        "random-real-targets": "3dc3859c98ad864e",
        "teacher": "3c29e3c7701602fa",
        "no-pretrain": "cea06203047b09cc",
    }
    for method, key in pinned.items():
        assert (
            stage_key(
                evaluate_method,
                method=method,
                seed=2,
                source=r["dataset"],
                teacher=r["ssl-teacher"],
                distilled=r["krr-st"],
                target=r["target"],
                transfer=transfer,
            )
            == key
        ), method
    rows = [{"eval_key": "b"}, {"eval_key": "a"}]
    assert stage_key(report_metrics, rows=rows, name="krr-x") == "9fe2e296d6614d2d"


def test_metrics_stages_have_one_schema_each():
    """The one `metrics` folder held two schemas; each now has its own stage name (so new keys)."""
    from tasks.evaluation import METRICS_STAGE as EVAL_METRICS
    from tasks.evaluation import collect_metrics
    from tasks.krr import METRICS_STAGE as KRR_METRICS

    rows = [{"eval_key": "a"}, {"eval_key": "b"}]
    assert (EVAL_METRICS, KRR_METRICS) == ("eval-metrics", "krr-metrics")
    expected = artifact_key("eval-metrics", {"name": "baseline-x"}, ["a", "b"])
    assert stage_key(collect_metrics, rows=rows, name="baseline-x") == expected


def test_pipeline_report_key_is_unchanged(tmp_path, monkeypatch):
    from tasks import pipeline
    from tasks.evaluation import MetricsTable
    from tasks.krr import KRRResult
    from tasks.matching import TMResult

    r = _refs(str(tmp_path))
    rows, notes = [{"path": "p", "method": "m", "test_acc_mean": 0.5}], ["n"]
    monkeypatch.setattr(pipeline, "report_rows", lambda results: rows)
    monkeypatch.setattr(pipeline, "report_notes", lambda results, plan: notes)

    def table(key: str) -> MetricsTable:
        return MetricsTable(summary=[], ref=ArtifactRef(store=str(tmp_path), stage="krr-metrics", key=key))

    krr = KRRResult(
        source=r["dataset"], target=r["target"], teacher=r["ssl-teacher"], distilled=r["krr-st"], metrics=table("a")
    )
    results = pipeline.PipelineResults(
        transfer=pipeline.TransferPath(chain=[r["dataset"]], selection=r["dataset"], ratio=0.5, krr=krr),
        target=TMResult(dataset=r["target"], experts=r["experts"], distilled={}, sets=[], metrics=table("b")),
    )
    assert stage_key(pipeline.report_pipeline, results=results, notes=[], name="pipeline-x") == "9955d087aa3d2c23"


def test_a_follow_up_matching_switch_names_another_set(tmp_path):
    from distill.matching import MatchConfig
    from tasks.matching import distill_tm

    r = _refs(str(tmp_path))
    base = MatchConfig(ipc=2, iterations=7, syn_steps=3, expert_epochs=1, max_start_epoch=2)
    keys = {
        stage_key(distill_tm, dataset=r["dataset"], experts=r["experts"], cfg=cfg, eval=EVAL)
        for cfg in (base, base.model_copy(update={"ema_decay": 0.9}), base.model_copy(update={"iterations": 8}))
    }
    assert len(keys) == 3


def test_pruning_and_transfer_keys_are_unchanged(tmp_path):
    from distill.transfer import TransferConfig
    from dp4tl.methods import SelectionConfig
    from dp4tl.surrogate import SurrogateConfig
    from tasks.prune import SelectionInfo, materialize_pruned, select, surrogate
    from tasks.transfer import (
        pretrain_transfer,
        pretrain_weights,
        report_transfer,
        transfer_eval,
    )

    r = _refs(str(tmp_path))
    sur = SurrogateConfig(net_kwargs={"width": 8, "depth": 1})
    assert stage_key(surrogate, source=r["dataset"], cfg=sur, weights=None) == "3f9b27d7b67eb123"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really weights")
    assert stage_key(surrogate, source=r["dataset"], cfg=sur, weights=str(weights)) == "2e5b936ed6d0579b"
    sel = SelectionConfig(methods=["lm", "random"], ratios=[0.5], seeds=[0, 1])
    assert (
        stage_key(
            select,
            source=r["dataset"],
            target=r["target"],
            surrogate_ref=r["surrogate"],
            method="random",
            seed=1,
            cfg=sel,
        )
        == "267d6adffb57811f"
    )
    store = ArtifactStore(str(tmp_path))
    info = SelectionInfo(
        method="random",
        selector="random",
        surrogate_fingerprint="f",
        features={},
        num_source_samples=9,
        kept=[{"ratio": 0.5, "digest": "abcdef0123456789"}],
        rows={"kept": 1},
    )
    selection = store.publish("selection", "k0", lambda staging: info.manifest_fields())
    selection_ref = ArtifactRef(store=str(tmp_path), stage="selection", key=selection.key)
    pruned = stage_key(materialize_pruned, source=r["dataset"], selection_ref=selection_ref, ratio=0.5)
    assert pruned == "809d2b000cf99a78"

    # One recipe (distill.transfer, issue 13): pretrain keys hold the net and pretraining only, transfer
    # keys how the backbone is judged; both moved with that change, on purpose.
    transfer = TransferConfig(net_kwargs={"width": 8, "depth": 1})
    assert stage_key(pretrain_weights, dataset=r["dataset"], cfg=transfer, seed=4) == "5b2cf047db05919c"
    assert (
        stage_key(transfer_eval, pretrained=r["pretrain"], target=r["target"], cfg=transfer, seed=4)
        == "362e2d5f8e2c1062"
    )
    assert stage_key(transfer_eval, pretrained=None, target=r["target"], cfg=transfer, seed=4) == "fb0665d5691c3709"
    assert (
        stage_key(
            pretrain_transfer,
            source=r["dataset"],
            target=r["target"],
            transfer=transfer,
            seed=4,
            method="lm",
            ratio=0.5,
        )
        == "64db0cd215dcd68e"
    )
    rows = [{"transfer_key": "b"}, {"transfer_key": "a"}]
    # the report moved from the shared `metrics` folder to its own stage: a new key for the same inputs
    assert stage_key(report_transfer, rows=rows, name="prune-eval-x") == artifact_key(
        "transfer-metrics", {"name": "prune-eval-x"}, ["a", "b"]
    )

"""Stages `random-real`, `random-real-soft`, `eval`, `eval-real` and `eval-metrics`: the honest
baselines and the shared evaluation.

`random_subset` takes a seeded random real subset at k images per class and stores it in
the distilled-dataset format, so it is evaluated, shipped and loaded exactly like a
distilled set; `soft_subset` gives such a subset an expert set's soft labels (the baseline
that "A Label is Worth a Thousand Images in Dataset Distillation" shows to be strong).
`evaluate_distilled` trains one fresh network on any distilled-format artifact (one Ray task
per seed), on its hard labels or on its own soft labels, and stores its metrics row;
`evaluate_full_real` does the same on the whole real training set (once per dataset, recipe
and seed). `collect_metrics` gathers the rows into the metrics Parquet (one row per method,
setting, label kind and seed), their mean and std, and DD-Ranking's HLR / IOR / LRS per
distilled set (distill.ranking).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from distill.data import check_ipc, load_images, read_labels, sample_per_class
from distill.evaluate import EvalConfig, evaluate_set, summarize_groups
from distill.formats import read_distilled, read_metrics, write_distilled, write_metrics
from distill.ranking import FULL_REAL, HARD, SOFT, full_setting, ranking_rows
from distill.transforms import Preprocessor
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import DatasetInfo, data_config, load_preprocessor, preprocessed
from tasks.runtime import task_device
from tasks.stage import Key, Publish, RowsInfo, StageInfo, StageRun, stage
from tasks.store import Staging

RANDOM_REAL = "random-real"  # the baseline: its method name in tables and in the distilled format
SUBSET_STAGE = RANDOM_REAL
SOFT_SUBSET_STAGE = "random-real-soft"
EVAL_STAGE = "eval"
REAL_EVAL_STAGE = "eval-real"
METRICS_STAGE = "eval-metrics"

LabelKind = Literal["hard", "soft"]


class RankingConfig(BaseModel):
    """The extra evaluations behind DD-Ranking's scores (distill.ranking), beside every distilled set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    soft_baseline: bool = Field(
        True,
        description="Also train on the random real subsets with an expert set's soft labels (its mean logits), "
        "and on a distilled set's own soft labels where it learned some.",
    )
    full_real: bool = Field(True, description="Train on the whole real training set once per recipe (for HLR).")
    full_real_epochs: int | None = Field(
        None,
        ge=1,
        description="Epochs for the full real set (null: the recipe's own). The recipe's epochs suit a few "
        "images; on thousands of images fewer epochs give the same optimizer steps many times over.",
    )


class DistilledInfo(StageInfo):
    """Manifest fields of a distilled-format artifact, as `distill.formats.write_distilled` reports them."""

    rows: int  # images
    classes: int
    shape: list[int]  # of one image, [channels, height, width]


class EvalInfo(StageInfo):
    rows: int
    test_acc: float


class MetricsTable(BaseModel):
    """A published metrics table: mean/std rows and the artifact holding every row (metrics.parquet)."""

    model_config = ConfigDict(frozen=True)

    summary: list[dict[str, Any]]
    ref: ArtifactRef
    ranking: list[dict[str, Any]] = []  # DD-Ranking scores per distilled set (distill.ranking); empty without


class EvaluatedSet(BaseModel):
    """A training set whose rows carry (method, setting) in a metrics table, and the artifacts that made it."""

    model_config = ConfigDict(frozen=True)

    method: str
    setting: str
    baseline: bool
    made_from: list[ArtifactRef]  # the chain that produced the set, the set itself last
    labels: LabelKind = HARD  # trained on class indices, or on the set's own soft labels


def setting(ipc: int, net: str) -> str:
    """The setting column of a metrics row: images per class and the evaluated architecture."""
    return f"ipc{ipc}/{net}"


def subset_key(dataset: ArtifactRef, ipc: int, seed: int, eval: EvalConfig) -> Key:
    return Key({"ipc": ipc, "seed": seed, "eval": eval}, [dataset.key])


@stage(SUBSET_STAGE, key=subset_key, task_name="random-real-subset")
def random_subset(dataset: ArtifactRef, ipc: int, seed: int, eval: EvalConfig, store: str, run: StageRun) -> Publish:
    """A seeded random real subset at `ipc` images per class, in the distilled-dataset format."""
    info = DatasetInfo.of(dataset)
    present = [c for c, n in enumerate(info.class_counts["train"]) if n > 0]  # a class-subset source keeps empty ids
    check_ipc(
        [info.class_counts["train"][c] for c in present], ipc, [info.class_names[c] for c in present], where=dataset.uri
    )
    pre = load_preprocessor(dataset)
    source = str(dataset.local_dir())
    labels, _ = read_labels(source, "train")
    idx = torch.sort(sample_per_class(labels, ipc, seed)).values
    # Decode only the chosen images: load_images draws the same per-class sample.
    picked = load_images(
        source,
        "train",
        classes=torch.unique(labels).tolist(),
        per_class=ipc,
        seed=seed,
        channels=info.image_shape[0],
    )
    assert torch.equal(picked.labels, labels[idx]), "per-class sampling disagrees with load_images"

    def write(staging: Staging) -> DistilledInfo:
        return DistilledInfo(
            **write_distilled(
                staging.path,
                pixels=pre(picked.images),
                labels=picked.labels,
                class_names=picked.class_names,
                preprocessor_config=pre.config(),
                preprocessor_tensors=pre.state_dict(),
                recipe=eval.recipe(),
                method=RANDOM_REAL,
                provenance={
                    "dataset": dataset.uri,
                    "data": data_config(dataset),
                    "ipc": ipc,
                    "seed": seed,
                    "indices": idx.tolist(),
                },
                previews=picked.images,
                filesystem=staging.fs,
            )
        )

    return Publish(write, seeds={"subset": seed})


def soft_subset_key(subset: ArtifactRef, experts: ArtifactRef) -> Key:
    return Key({"labels": "expert-mean-logits-last-epoch"}, [subset.key, experts.key])


@stage(SOFT_SUBSET_STAGE, key=soft_subset_key, task_name="random-real-soft-labels")
def soft_subset(subset: ArtifactRef, experts: ArtifactRef, store: str, run: StageRun) -> Publish:
    """A random real subset with an expert set's soft labels: the experts' mean logits at their last epoch."""
    from distill.matching import expert_logits
    from distill.trajectory import TrajectorySet

    syn = read_distilled(str(subset.local_dir()))
    trajectories = TrajectorySet(experts.local_dir())
    if trajectories.meta.get("num_classes", len(syn.class_names)) != len(syn.class_names):
        raise ValueError(
            f"expert set {experts.uri} predicts {trajectories.meta.get('num_classes')} classes, "
            f"the subset {subset.uri} has {len(syn.class_names)}"
        )
    logits = expert_logits(trajectories, syn.pixels, task_device()).cpu().float()
    previews = Preprocessor.from_state(syn.preprocessor_config, syn.preprocessor_tensors).to_uint8(syn.pixels)

    def write(staging: Staging) -> DistilledInfo:
        return DistilledInfo(
            **write_distilled(
                staging.path,
                pixels=syn.pixels,
                labels=syn.labels,
                class_names=syn.class_names,
                preprocessor_config=syn.preprocessor_config,
                preprocessor_tensors=syn.preprocessor_tensors,
                recipe=syn.recipe,
                method=RANDOM_REAL,
                provenance={
                    **syn.provenance,  # the subset's own: dataset, seed, indices
                    "subset": subset.uri,
                    "experts": experts.uri,
                    "soft_labels": "mean logits of the experts at their last epoch",
                },
                previews=previews,
                soft_labels=logits,
                filesystem=staging.fs,
            )
        )

    return Publish(write)


def eval_key(distilled: ArtifactRef, dataset: ArtifactRef, eval: EvalConfig, seed: int, labels: str) -> Key:
    params: dict[str, Any] = {"eval": eval, "seed": seed}
    if labels != HARD:  # hard-label evaluations keep the keys they had before label kinds existed
        params["labels"] = labels
    return Key(params, [distilled.key, dataset.key])


def metrics_row(ref: ArtifactRef) -> dict[str, Any]:
    """The one row of a published evaluation (files verified: the row is read from them)."""
    art = ref.open()
    return read_metrics(art.file("metrics.parquet"), filesystem=art.fs)[0]


@stage(EVAL_STAGE, key=eval_key, result=metrics_row, task_name="evaluate", task_run_name="evaluate-{method}-seed{seed}")
def evaluate_distilled(
    distilled: ArtifactRef,
    dataset: ArtifactRef,
    eval: EvalConfig,
    seed: int,
    store: str,
    method: str,
    setting: str,
    run: StageRun,
    labels: LabelKind = HARD,
) -> Publish:
    """Train one fresh network on a distilled-format set and test it on the real test split.

    labels: hard trains on the class indices (cross-entropy); soft on the set's own soft labels
    (cross-entropy against their softmax; refused when the set has none)."""
    device = task_device()
    syn = read_distilled(str(distilled.local_dir()))
    test_x, test_y, names = preprocessed(dataset, "test")
    targets, cfg = syn.labels, eval
    if labels == SOFT:
        if syn.soft_labels is None:
            raise ValueError(f"{distilled.uri} has no soft labels to train on (labels='soft'); use labels='hard'")
        targets = syn.soft_labels
        cfg = eval.model_copy(update={"train": eval.train.model_copy(update={"loss": "soft_ce"})})
    progress = reports.progress(f"{method} {setting} {labels} seed {seed}", method, setting, labels, "seed", seed)
    row = evaluate_set(
        syn.pixels,
        targets,
        test_x,
        test_y,
        cfg,
        num_classes=len(names),
        seed=seed,
        learned_lr=syn.learned_lr,
        device=device,
        progress=progress,
    )
    return _publish_row({"method": method, "setting": setting, "labels": labels, "net": eval.net, **row}, seed, run)


def _publish_row(row: dict[str, Any], seed: int, run: StageRun) -> Publish:
    """Log one evaluation row and publish it as the stage's metrics.parquet (eval and eval-real)."""
    row = {**row, "eval_key": run.key}
    reports.run_logger().info(
        "%s %s (%s labels) seed %d: test acc %.4f", row["method"], row["setting"], row["labels"], seed, row["test_acc"]
    )

    def write(staging: Staging) -> EvalInfo:
        write_metrics(staging.file("metrics.parquet"), [row], filesystem=staging.fs)
        return EvalInfo(rows=1, test_acc=row["test_acc"])

    return Publish(write, seeds={"train": seed})


def real_eval_key(dataset: ArtifactRef, eval: EvalConfig, seed: int, epochs: int | None) -> Key:
    return Key({"eval": eval, "seed": seed, "epochs": epochs}, [dataset.key])


@stage(
    REAL_EVAL_STAGE,
    key=real_eval_key,
    result=metrics_row,
    task_name="evaluate-full-real",
    task_run_name="evaluate-full-real-{eval.net}-seed{seed}",
)
def evaluate_full_real(
    dataset: ArtifactRef, eval: EvalConfig, seed: int, epochs: int | None, store: str, run: StageRun
) -> Publish:
    """Train one fresh network on the whole real training set (hard labels; `epochs` replaces the
    recipe's when given) and test it: the upper reference of DD-Ranking's HLR."""
    device = task_device()
    train_x, train_y, names = preprocessed(dataset, "train")
    test_x, test_y, _ = preprocessed(dataset, "test")
    cfg = (
        eval if epochs is None else eval.model_copy(update={"train": eval.train.model_copy(update={"epochs": epochs})})
    )
    setting_ = full_setting(eval.net)
    progress = reports.progress(f"{FULL_REAL} {setting_} seed {seed}", FULL_REAL, setting_, "seed", seed)
    row = evaluate_set(
        train_x, train_y, test_x, test_y, cfg, num_classes=len(names), seed=seed, device=device, progress=progress
    )
    return _publish_row({"method": FULL_REAL, "setting": setting_, "labels": HARD, "net": eval.net, **row}, seed, run)


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std of final-epoch test accuracy over seeds, per (method, setting, labels)."""
    rows = [{**r, "labels": r.get("labels") or HARD} for r in rows]  # rows from before label kinds: hard
    return summarize_groups(rows, ("method", "setting", "labels"), ("test_acc",), sort_key=lambda group: group)


def metrics_key(rows: list[dict[str, Any]], name: str) -> Key:
    return Key({"name": name}, [r["eval_key"] for r in rows])


def show_metrics(ref: ArtifactRef, name: str) -> MetricsTable:
    """The published table, shown in this flow run's UI (a cache hit shows it too)."""
    art = ref.open()
    summary = read_metrics(art.file("summary.parquet"), filesystem=art.fs)
    reports.table(
        summary,
        key=reports.ui_key(name, "summary"),
        description=f"{name}: final-epoch test accuracy, mean and std over seeds (labels: what the nets were "
        f"trained on). Metrics: {art.uri}",
    )
    ranking = (
        read_metrics(art.file("ranking.parquet"), filesystem=art.fs)
        if "ranking.parquet" in art.manifest["files"]
        else []
    )
    if ranking:
        reports.table(
            ranking,
            key=reports.ui_key(name, "ranking"),
            description=f"{name}: DD-Ranking scores (fractions): HLR = full real - set (hard labels), lower is "
            "better; IOR = set - random real with the same kind of labels, higher is better; LRS in [0, 1], "
            "higher is better (0.269 where IOR = HLR).",
        )
    return MetricsTable(summary=summary, ref=ref, ranking=ranking)


@stage(METRICS_STAGE, key=metrics_key, result=show_metrics, cache=False, task_name="collect-metrics")
def collect_metrics(rows: list[dict[str, Any]], name: str, store: str, run: StageRun) -> Publish:
    """Write all metric rows to one Parquet and their mean/std per (method, setting) to another."""

    summary = summary_rows(rows)
    ranking = ranking_rows(summary, RANDOM_REAL)

    def write(staging: Staging) -> RowsInfo:
        write_metrics(staging.file("metrics.parquet"), rows, filesystem=staging.fs)
        write_metrics(staging.file("summary.parquet"), summary, filesystem=staging.fs)
        if ranking:
            write_metrics(staging.file("ranking.parquet"), ranking, filesystem=staging.fs)
        return RowsInfo(rows=len(rows))

    return Publish(write)

"""Stages `random-real`, `eval` and `eval-metrics`: the honest baseline and the shared evaluation.

`random_subset` takes a seeded random real subset at k images per class and stores it in
the distilled-dataset format, so it is evaluated, shipped and loaded exactly like a
distilled set. `evaluate_distilled` trains one fresh network on any distilled-format
artifact (one Ray task per seed) and stores its metrics row; `collect_metrics` gathers the
rows into the metrics Parquet (one row per method, setting and seed) and a table artifact
with mean and std per (method, setting).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from distill.data import check_ipc, load_images, read_labels, sample_per_class
from distill.evaluate import EvalConfig, evaluate_set, summarize
from distill.formats import read_distilled, read_metrics, write_distilled, write_metrics
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import DatasetInfo, data_config, load_preprocessor, preprocessed
from tasks.runtime import task_device
from tasks.stage import Key, Publish, RowsInfo, StageInfo, StageRun, stage
from tasks.store import Staging

RANDOM_REAL = "random-real"  # the baseline: its method name in tables and in the distilled format
SUBSET_STAGE = RANDOM_REAL
EVAL_STAGE = "eval"
METRICS_STAGE = "eval-metrics"


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


class EvaluatedSet(BaseModel):
    """A training set whose rows carry (method, setting) in a metrics table, and the artifacts that made it."""

    model_config = ConfigDict(frozen=True)

    method: str
    setting: str
    baseline: bool
    made_from: list[ArtifactRef]  # the chain that produced the set, the set itself last


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
    picked = load_images(source, "train", classes=torch.unique(labels).tolist(), per_class=ipc, seed=seed)
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


def eval_key(distilled: ArtifactRef, dataset: ArtifactRef, eval: EvalConfig, seed: int) -> Key:
    return Key({"eval": eval, "seed": seed}, [distilled.key, dataset.key])


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
) -> Publish:
    """Train one fresh network on a distilled-format set and test it on the real test split."""
    device = task_device()
    syn = read_distilled(str(distilled.local_dir()))
    test_x, test_y, names = preprocessed(dataset, "test")
    progress = reports.progress(f"{method} {setting} seed {seed}", method, setting, "seed", seed)
    row = evaluate_set(
        syn.pixels,
        syn.labels,
        test_x,
        test_y,
        eval,
        num_classes=len(names),
        seed=seed,
        learned_lr=syn.learned_lr,
        device=device,
        progress=progress,
    )
    row = {"method": method, "setting": setting, "net": eval.net, **row, "eval_key": run.key}
    reports.run_logger().info("%s %s seed %d: test acc %.4f", method, setting, seed, row["test_acc"])

    def write(staging: Staging) -> EvalInfo:
        write_metrics(staging.file("metrics.parquet"), [row], filesystem=staging.fs)
        return EvalInfo(rows=1, test_acc=row["test_acc"])

    return Publish(write, seeds={"train": seed})


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std of final-epoch test accuracy over seeds, per (method, setting)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r["test_acc"])
    summary = []
    for (method, setting), accs in sorted(groups.items()):
        s = summarize(accs)
        summary.append(
            {
                "method": method,
                "setting": setting,
                "test_acc_mean": s["mean"],
                "test_acc_std": s["std"],
                "seeds": s["n"],
            }
        )
    return summary


def metrics_key(rows: list[dict[str, Any]], name: str) -> Key:
    return Key({"name": name}, [r["eval_key"] for r in rows])


def show_metrics(ref: ArtifactRef, name: str) -> MetricsTable:
    """The published table, shown in this flow run's UI (a cache hit shows it too)."""
    art = ref.open()
    summary = read_metrics(art.file("summary.parquet"), filesystem=art.fs)
    reports.table(
        summary,
        key=reports.ui_key(name, "summary"),
        description=f"{name}: final-epoch test accuracy, mean and std over seeds. Metrics: {art.uri}",
    )
    return MetricsTable(summary=summary, ref=ref)


@stage(METRICS_STAGE, key=metrics_key, result=show_metrics, cache=False, task_name="collect-metrics")
def collect_metrics(rows: list[dict[str, Any]], name: str, store: str, run: StageRun) -> Publish:
    """Write all metric rows to one Parquet and their mean/std per (method, setting) to another."""

    def write(staging: Staging) -> RowsInfo:
        write_metrics(staging.file("metrics.parquet"), rows, filesystem=staging.fs)
        write_metrics(staging.file("summary.parquet"), summary_rows(rows), filesystem=staging.fs)
        return RowsInfo(rows=len(rows))

    return Publish(write)

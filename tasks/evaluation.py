"""Stages `random-real`, `eval` and `metrics`: the honest baseline and the shared evaluation.

`random_subset` takes a seeded random real subset at k images per class and stores it in
the distilled-dataset format, so it is evaluated, shipped and loaded exactly like a
distilled set. `evaluate_distilled` trains one fresh network on any distilled-format
artifact (one Ray task per seed) and stores its metrics row; `collect_metrics` gathers the
rows into the metrics Parquet and a table artifact with mean and std.
"""

from __future__ import annotations

from typing import Any

import torch

from prefect import task

from distill.data import DataError, load_images, read_labels, sample_per_class
from distill.evaluate import EvalConfig, evaluate_set, summarize
from distill.formats import read_distilled, read_metrics, write_distilled, write_metrics
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import class_counts, data_config, load_preprocessor, preprocessed
from tasks.runtime import task_device
from tasks.store import ArtifactStore, Staging, store_cache_key_fn

SUBSET_STAGE = "random-real"
EVAL_STAGE = "eval"
METRICS_STAGE = "metrics"


def check_ipc(dataset: ArtifactRef, ipc: int) -> None:
    """Refuse k images per class larger than the smallest class, before any training."""
    counts = class_counts(dataset, "train")
    names = dataset.open(verify=False).manifest["class_names"]
    short = [(names[c], n) for c, n in enumerate(counts) if 0 < n < ipc]
    if ipc < 1 or short:
        detail = ", ".join(f"{name!r} has {n}" for name, n in short[:5])
        raise DataError(
            f"images per class k={ipc} is not possible: k must be >= 1 and at most the smallest class "
            f"({min(c for c in counts if c > 0)} images){'; ' + detail if detail else ''}"
        )


def _subset_key(p: dict[str, Any]) -> tuple[str, str]:
    cfg = {"ipc": p["ipc"], "seed": p["seed"], "eval": p["eval"]}
    return p["store"], ArtifactStore(p["store"]).key(SUBSET_STAGE, cfg, [p["dataset"].key])


@task(name="random-real-subset", cache_key_fn=store_cache_key_fn(SUBSET_STAGE, _subset_key), result_serializer="json")
def random_subset(dataset: ArtifactRef, ipc: int, seed: int, eval: EvalConfig, store: str) -> ArtifactRef:
    """A seeded random real subset at `ipc` images per class, in the distilled-dataset format."""
    _, key = _subset_key({"store": store, "ipc": ipc, "seed": seed, "eval": eval, "dataset": dataset})
    st = ArtifactStore(store)
    if st.exists(SUBSET_STAGE, key):
        return ArtifactRef(store=store, stage=SUBSET_STAGE, key=key)
    check_ipc(dataset, ipc)
    pre = load_preprocessor(dataset)
    source = str(dataset.local_dir())
    labels, _ = read_labels(source, "train")
    idx = torch.sort(sample_per_class(labels, ipc, seed)).values
    # Decode only the chosen images: load_images draws the same per-class sample.
    picked = load_images(source, "train", classes=torch.unique(labels).tolist(), per_class=ipc, seed=seed)
    assert torch.equal(picked.labels, labels[idx]), "per-class sampling disagrees with load_images"

    def write(staging: Staging) -> dict[str, Any]:
        return write_distilled(
            staging.path,
            pixels=pre(picked.images),
            labels=picked.labels,
            class_names=picked.class_names,
            preprocessor_config=pre.config(),
            preprocessor_tensors=pre.state_dict(),
            recipe=eval.recipe(),
            method="random-real",
            provenance={"dataset": dataset.uri, "data": data_config(dataset), "ipc": ipc, "seed": seed, "indices": idx.tolist()},
            previews=picked.images,
            filesystem=staging.fs,
        )

    st.publish(SUBSET_STAGE, key, write, config={"ipc": ipc, "eval": eval}, inputs=[dataset.key], seeds={"subset": seed})
    return ArtifactRef(store=store, stage=SUBSET_STAGE, key=key)


def _eval_key(p: dict[str, Any]) -> tuple[str, str]:
    cfg = {"eval": p["eval"], "seed": p["seed"]}
    return p["store"], ArtifactStore(p["store"]).key(EVAL_STAGE, cfg, [p["distilled"].key, p["dataset"].key])


@task(
    name="evaluate",
    task_run_name="evaluate-{method}-seed{seed}",
    cache_key_fn=store_cache_key_fn(EVAL_STAGE, _eval_key),
    result_serializer="json",
)
def evaluate_distilled(
    distilled: ArtifactRef, dataset: ArtifactRef, eval: EvalConfig, seed: int, store: str, method: str, setting: str
) -> dict[str, Any]:
    """Train one fresh network on a distilled-format set and test it on the real test split."""
    _, key = _eval_key({"store": store, "eval": eval, "seed": seed, "distilled": distilled, "dataset": dataset})
    st = ArtifactStore(store)
    if not st.exists(EVAL_STAGE, key):
        device = task_device()
        syn = read_distilled(str(distilled.local_dir()))
        test_x, test_y, names = preprocessed(dataset, "test")
        progress = reports.prefect_progress(
            f"{method} {setting} seed {seed}", key=reports.artifact_key("progress", method, setting, "seed", seed)
        )
        row = evaluate_set(
            syn.pixels, syn.labels, test_x, test_y, eval,
            num_classes=len(names), seed=seed, learned_lr=syn.learned_lr, device=device, progress=progress,
        )
        row = {"method": method, "setting": setting, "net": eval.net, **row, "eval_key": key}

        def write(staging: Staging) -> dict[str, Any]:
            write_metrics(staging.file("metrics.parquet"), [row], filesystem=staging.fs)
            return {"rows": 1, "test_acc": row["test_acc"]}

        st.publish(EVAL_STAGE, key, write, config={"eval": eval, "seed": seed}, inputs=[distilled.key, dataset.key], seeds={"train": seed})
        reports.run_logger().info("%s %s seed %d: test acc %.4f", method, setting, seed, row["test_acc"])
    art = st.open(EVAL_STAGE, key)
    return read_metrics(art.file("metrics.parquet"), filesystem=art.fs)[0]


def _metrics_key(p: dict[str, Any]) -> tuple[str, str]:
    inputs = [r["eval_key"] for r in p["rows"]]
    return p["store"], ArtifactStore(p["store"]).key(METRICS_STAGE, {"name": p["name"]}, inputs)


@task(name="collect-metrics", result_serializer="json")
def collect_metrics(rows: list[dict[str, Any]], name: str, store: str) -> dict[str, Any]:
    """Write all metric rows to one Parquet, publish a mean/std table, return the summary."""
    _, key = _metrics_key({"rows": rows, "name": name, "store": store})
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r["test_acc"])
    summary = []
    for (method, setting), accs in sorted(groups.items()):
        s = summarize(accs)
        summary.append({"method": method, "setting": setting, "test_acc_mean": s["mean"], "test_acc_std": s["std"], "seeds": s["n"]})

    def write(staging: Staging) -> dict[str, Any]:
        write_metrics(staging.file("metrics.parquet"), rows, filesystem=staging.fs)
        write_metrics(staging.file("summary.parquet"), summary, filesystem=staging.fs)
        return {"rows": len(rows)}

    art = ArtifactStore(store).publish(
        METRICS_STAGE, key, write, config={"name": name}, inputs=[r["eval_key"] for r in rows]
    )
    reports.table(
        summary,
        key=reports.artifact_key(name, "summary"),
        description=f"{name}: final-epoch test accuracy, mean and std over seeds. Metrics: {art.uri}",
    )
    return {"summary": summary, "metrics_uri": art.uri}

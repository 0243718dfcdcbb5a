"""Stages `ssl-teacher`, `krr-st`, `krr-eval` and `krr-metrics`: KRR-ST distillation and its transfer table.

- `train_teacher_task`: a Barlow Twins teacher on a source dataset artifact (any artifact in
  the `dataset` layout: a materialized input or a DP4TL-pruned source). Its key is (teacher
  config, source key), so every run on the same source reuses it.
- `distill_krr_st`: KRR-ST on (source, teacher); checkpoints in a work directory that outlives
  task retries, published as a distilled-format dataset with a `target` column, the
  pretraining recipe, the source normalization, the teacher's fingerprint and a dataset card,
  plus the outer-loss history (`loss.parquet`).
- `report_distilled`: the image grid and the loss curve as a Prefect markdown artifact.
- `evaluate_method`: one (method, seed) of distill.krr.METHODS: pretrain a fresh student, then
  linear probe and fine-tune on the target; one Ray task each, cached per (method, seed,
  transfer config, the artifacts that method reads).
- `report_metrics`: metrics Parquet, mean/std per method, a table artifact.

Every stage is a `tasks.stage` body: keyed, cached and published by the decorator.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from prefect import task
from pydantic import BaseModel, ConfigDict

from distill.evaluate import summarize
from distill.formats import read_distilled, read_metrics, write_distilled, write_metrics
from distill.fsio import write_bytes
from distill.krr import (
    METHODS,
    KRRConfig,
    TransferConfig,
    check_labels,
    check_methods,
    krr_distill,
    loss_curve,
    pretrained_backbone,
    representations,
)
from distill.ssl import TEACHER_FILE, SSLConfig, load_teacher, train_teacher
from distill.transforms import Preprocessor
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import DatasetInfo, load_preprocessor, preprocessed
from tasks.evaluation import DistilledInfo, MetricsTable, metrics_key, metrics_row
from tasks.runtime import task_device
from tasks.stage import Key, Publish, RowsInfo, StageInfo, StageRun, stage
from tasks.store import Staging
from tasks.tables import markdown_table

TEACHER_STAGE = "ssl-teacher"
DISTILL_STAGE = "krr-st"
EVAL_STAGE = "krr-eval"
METRICS_STAGE = "krr-metrics"


class TeacherInfo(StageInfo):
    feature_dim: int
    epochs: int
    loss: float
    fingerprint: str  # of the teacher's weights; recorded with every distilled set made from it
    seconds: float


class KRRSetInfo(DistilledInfo):
    """Manifest fields of a KRR-ST distilled set."""

    final_loss: float
    seconds: float
    teacher_fingerprint: str
    pool: Any  # the online model pool's settings (distill.krr.KRRResult.pool)


class KRREvalInfo(StageInfo):
    rows: int
    linear_probe_acc: float
    fine_tune_acc: float


class KRRResult(BaseModel):
    """What KRR-ST on one source produced: its teacher, distilled set and the comparison table."""

    model_config = ConfigDict(frozen=True)

    source: ArtifactRef
    target: ArtifactRef
    teacher: ArtifactRef
    distilled: ArtifactRef
    metrics: MetricsTable


def check_num_images(krr: KRRConfig, available: int, where: str) -> None:
    """Refuse more synthetic images than the source has train images."""
    if krr.num_images > available:
        raise ValueError(
            f"krr.num_images={krr.num_images} synthetic images requested but the source {where} has only "
            f"{available} train images; use num_images <= {available} (KRR-ST uses ~2% of the source)"
        )


def check_inputs(source: ArtifactRef, target: ArtifactRef, krr: KRRConfig, methods: list[str]) -> None:
    """Refuse, from the manifests alone, what would fail after minutes of training."""
    check_methods(methods)
    src, tgt = DatasetInfo.of(source), DatasetInfo.of(target)
    check_num_images(krr, src.rows["train"], source.uri)
    if src.image_shape != tgt.image_shape:
        raise ValueError(
            f"source images are {src.image_shape} but target images are {tgt.image_shape}; "
            "set the same image_size in both data blocks (the paper resizes targets to the source resolution)"
        )
    needs_labels = [m for m in methods if METHODS[m].loss == "ce"]
    labelled = sum(1 for c in src.class_counts["train"] if c > 0)
    if needs_labels and labelled < 2:
        check_labels(needs_labels[0], torch.zeros(1, dtype=torch.long))  # raises with the standard message


# ---------------------------------------------------------------- teacher


def teacher_key(source: ArtifactRef, cfg: SSLConfig) -> Key:
    return Key(cfg, [source.key])


@stage(TEACHER_STAGE, key=teacher_key)
def train_teacher_task(source: ArtifactRef, cfg: SSLConfig, store: str, run: StageRun) -> Publish:
    """Train (or resume) the Barlow Twins teacher of a source; publish teacher.safetensors."""
    device = task_device()
    x, _, _ = preprocessed(source, "train")
    summary = train_teacher(
        cfg,
        x,
        out_dir=run.work_dir(),
        dataset_fingerprint=DatasetInfo.of(source).fingerprints["train"],
        device=device,
        progress=reports.progress("Barlow Twins teacher", "ssl-teacher"),
    )
    reports.run_logger().info(
        "teacher: Barlow Twins loss %.4f after %d epochs (%.0f s)",
        summary["loss"],
        summary["epochs"],
        summary["seconds"],
    )

    def write(staging: Staging) -> TeacherInfo:
        write_bytes(staging.fs, staging.file(TEACHER_FILE), Path(summary["path"]).read_bytes())
        write_metrics(staging.file("history.parquet"), summary["history"], filesystem=staging.fs)
        return TeacherInfo(**{k: summary[k] for k in ("feature_dim", "epochs", "loss", "fingerprint", "seconds")})

    return Publish(write, seeds={"teacher": cfg.seed})


def open_teacher(ref: ArtifactRef) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The teacher backbone (eval mode) and its manifest."""
    return load_teacher(ref.local_dir() / TEACHER_FILE), ref.open(verify=False).manifest


# ---------------------------------------------------------------- distillation


def pretrain_recipe(transfer_cfg: TransferConfig) -> dict[str, Any]:
    """How to pretrain on the distilled set, as stored with it (MSE to `target`)."""
    train_cfg = transfer_cfg.pretrain.model_copy(update={"loss": "mse"})
    return {
        "net": transfer_cfg.net,
        "net_kwargs": dict(transfer_cfg.net_kwargs),
        "train": train_cfg.model_dump(mode="json"),
    }


def distill_key(source: ArtifactRef, teacher: ArtifactRef, cfg: KRRConfig, transfer: TransferConfig) -> Key:
    return Key({"krr": cfg, "recipe": pretrain_recipe(transfer)}, [source.key, teacher.key])


@stage(DISTILL_STAGE, key=distill_key, task_name="distill-krr-st")
def distill_krr_st(
    source: ArtifactRef, teacher: ArtifactRef, cfg: KRRConfig, transfer: TransferConfig, store: str, run: StageRun
) -> Publish:
    """Distill the source into cfg.num_images images with learned targets; publish it in the distilled format."""
    device = task_device()
    pre = load_preprocessor(source)
    x, labels, names = preprocessed(source, "train", pre)
    teacher_net, teacher_manifest = open_teacher(teacher)
    source_fp = DatasetInfo.of(source).fingerprints["train"]
    result = krr_distill(
        cfg,
        x,
        teacher_net,
        work_dir=run.work_dir(),
        device=device,
        progress=reports.progress("KRR-ST distillation", "krr-st"),
        identity={"source": source_fp, "teacher": teacher_manifest["fingerprint"]},
    )
    idx = result.source_indices
    reports.run_logger().info(
        "KRR-ST: %d images, outer loss %.4g -> %.4g (%.0f s)",
        len(idx),
        result.history[0]["loss"],
        result.history[-1]["loss"],
        result.seconds,
    )

    def write(staging: Staging) -> KRRSetInfo:
        info = write_distilled(
            staging.path,
            pixels=result.images.float().contiguous(),
            labels=labels[idx],  # the classes the images started from; KRR-ST itself never reads labels
            class_names=names,
            preprocessor_config=pre.config(),
            preprocessor_tensors=pre.state_dict(),
            recipe=pretrain_recipe(transfer),
            method="krr-st",
            provenance={
                "source": source.uri,
                "source_fingerprint": source_fp,
                "teacher": teacher.uri,
                "teacher_fingerprint": teacher_manifest["fingerprint"],
                "teacher_feature_dim": teacher_manifest["feature_dim"],
                "teacher_config": teacher_manifest["config"],
                "krr": cfg.model_dump(mode="json"),
                "source_indices": idx.tolist(),
                "pool": result.pool,
            },
            previews=pre.to_uint8(result.images),
            targets=result.targets.float(),
            filesystem=staging.fs,
        )
        write_metrics(staging.file("loss.parquet"), result.history, filesystem=staging.fs)
        return KRRSetInfo(
            **info,
            final_loss=result.history[-1]["loss"],
            seconds=result.seconds,
            teacher_fingerprint=teacher_manifest["fingerprint"],
            pool=result.pool,
        )

    return Publish(write, seeds={"krr": cfg.seed})


def image_grid_png(images_uint8: torch.Tensor, columns: int = 20, scale: int = 2) -> bytes:
    """A PNG grid of uint8 images [N, C, H, W], 1 px gaps, upscaled for the UI."""
    from PIL import Image

    n, c, h, w = images_uint8.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = torch.full((c, rows * (h + 1) + 1, columns * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = images_uint8[i]
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def loss_png(history: list[dict[str, Any]]) -> bytes:
    plt = reports.pyplot()

    steps, smooth = loss_curve(history)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(steps, [h["loss"] for h in history], alpha=0.3, label="per step")
    ax.plot(steps, smooth, label="moving average")
    ax.set(title="KRR-ST outer loss (MSE to teacher representations)", xlabel="outer step", yscale="log")
    ax.legend()
    return reports.figure_png(fig)


@task(name="report-krr-st", result_serializer="json")
def report_distilled(distilled: ArtifactRef, name: str) -> str:
    """Markdown artifact: the distilled images (8-bit previews) and the outer loss curve."""
    local = distilled.local_dir()
    syn = read_distilled(str(local))
    history = read_metrics(str(local / "loss.parquet"))
    previews = Preprocessor.from_state(syn.preprocessor_config, syn.preprocessor_tensors).to_uint8(syn.pixels)
    text = (
        f"## KRR-ST distilled set ({len(syn.pixels)} images, {syn.targets.shape[1]}-d targets)\n\n"
        f"Teacher `{syn.provenance['teacher_fingerprint']}`, pool {syn.provenance['pool']}. "
        f"Artifact: {distilled.uri}\n\n"
        + reports.png_markdown(image_grid_png(previews), "distilled images")
        + "\n"
        + reports.png_markdown(loss_png(history), "outer loss")
    )
    reports.markdown(text, key=reports.ui_key(name, "distilled"), description=f"{name}: KRR-ST distilled set")
    return distilled.uri


# ---------------------------------------------------------------- transfer evaluation


def _inputs_of(
    method: str, source: ArtifactRef, teacher: ArtifactRef, distilled: ArtifactRef, target: ArtifactRef
) -> list[str]:
    """The artifacts a method's number depends on: its cache key inputs."""
    data = METHODS[method].data
    if data == "distilled":
        return [distilled.key, target.key]
    if data == "initial":  # the distilled set names the initial images; the source holds them
        return [distilled.key, source.key, teacher.key, target.key]
    if data == "teacher":
        return [teacher.key, target.key]
    return [target.key]


def eval_key(
    method: str,
    seed: int,
    source: ArtifactRef,
    teacher: ArtifactRef,
    distilled: ArtifactRef,
    target: ArtifactRef,
    transfer: TransferConfig,
) -> Key:
    return Key(
        {"method": method, "seed": seed, "transfer": transfer}, _inputs_of(method, source, teacher, distilled, target)
    )


@stage(
    EVAL_STAGE, key=eval_key, result=metrics_row, task_name="krr-transfer", task_run_name="transfer-{method}-seed{seed}"
)
def evaluate_method(
    method: str,
    seed: int,
    source: ArtifactRef,
    teacher: ArtifactRef,
    distilled: ArtifactRef,
    target: ArtifactRef,
    transfer: TransferConfig,
    store: str,
    run: StageRun,
) -> Publish:
    """Pretrain per `method`, then linear probe + fine-tune on the target; one metrics row."""
    from distill.krr import transfer as run_transfer

    device = task_device()
    spec = METHODS[method]
    syn = read_distilled(str(distilled.local_dir()))
    shape = tuple(syn.pixels.shape[1:])
    images = targets = labels = teacher_net = None
    if spec.data == "distilled":
        images, targets = syn.pixels, syn.targets
    if spec.data in ("initial", "teacher"):
        teacher_net, _ = open_teacher(teacher)
    if spec.data == "initial":
        idx = torch.tensor(syn.provenance["source_indices"])
        x, y, _ = preprocessed(source, "train")
        images, labels = x[idx], y[idx]
        targets = representations(teacher_net, images)
    backbone, info = pretrained_backbone(
        method,
        transfer,
        image_shape=shape,
        images=images,
        targets=targets,
        labels=labels,
        teacher=teacher_net,
        seed=seed,
        device=device,
    )
    train_x, train_y, names = preprocessed(target, "train")
    test_x, test_y, _ = preprocessed(target, "test")
    result = run_transfer(
        backbone, train_x, train_y, test_x, test_y, transfer, num_classes=len(names), seed=seed, device=device
    )
    row = {"method": method, "seed": seed, **result, **info, "eval_key": run.key}
    reports.run_logger().info(
        "%s seed %d: linear %.4f, fine-tune %.4f", method, seed, row["linear_probe_acc"], row["fine_tune_acc"]
    )

    def write(staging: Staging) -> KRREvalInfo:
        write_metrics(staging.file("metrics.parquet"), [row], filesystem=staging.fs)
        return KRREvalInfo(rows=1, linear_probe_acc=row["linear_probe_acc"], fine_tune_acc=row["fine_tune_acc"])

    return Publish(write, seeds={"eval": seed})


def summarize_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per method, in METHODS order."""
    out = []
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        mine = [r for r in rows if r["method"] == method]
        lp, ft = summarize([r["linear_probe_acc"] for r in mine]), summarize([r["fine_tune_acc"] for r in mine])
        out.append(
            {
                "method": method,
                "linear_probe_acc_mean": lp["mean"],
                "linear_probe_acc_std": lp["std"],
                "fine_tune_acc_mean": ft["mean"],
                "fine_tune_acc_std": ft["std"],
                "seeds": lp["n"],
            }
        )
    return out


def show_metrics(ref: ArtifactRef, name: str) -> MetricsTable:
    """The published table, shown in this flow run's UI and log (a cache hit shows it too)."""
    art = ref.open()
    summary = read_metrics(art.file("summary.parquet"), filesystem=art.fs)
    reports.table(
        summary,
        key=reports.ui_key(name, "transfer"),
        description=f"{name}: target accuracy after pretraining (linear probe, fine-tune; final epoch, "
        f"mean and std over seeds). Metrics: {art.uri}",
    )
    reports.run_logger().info("\n%s", markdown_table(summary))
    return MetricsTable(summary=summary, ref=ref)


@stage(METRICS_STAGE, key=metrics_key, result=show_metrics, cache=False, task_name="report-krr-metrics")
def report_metrics(rows: list[dict[str, Any]], name: str, store: str, run: StageRun) -> Publish:
    """Metrics Parquet (every row) and summary Parquet (mean/std per method)."""

    def write(staging: Staging) -> RowsInfo:
        write_metrics(staging.file("metrics.parquet"), rows, filesystem=staging.fs)
        write_metrics(staging.file("summary.parquet"), summarize_rows(rows), filesystem=staging.fs)
        return RowsInfo(rows=len(rows))

    return Publish(write)

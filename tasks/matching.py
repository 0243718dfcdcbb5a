"""Stage `distill-tm`: trajectory-matching distillation of a dataset from a published expert set.

One Ray task per distilled set. The distillation checkpoints into a work directory that
outlives the task (`<store>/.work/distill-tm/<run key>`, keyed by what the images depend
on: match config, expert set, dataset), so a crashed or retried task resumes where it
stopped, and a finished run is kept there (a few images and the loss curve) so publishing
the same images with another evaluation recipe costs nothing. The artifact is the
distilled-dataset format (exact float pixels, 8-bit previews through the inverse
preprocessing, learned lr, evaluation recipe, preprocessor, provenance with the expert
set's key) plus `loss.parquet` (the matching-loss curve); an image grid and the loss curve
appear in the Prefect UI as markdown artifacts.

Before anything long, the expert set is checked against the dataset from metadata alone (its
manifest and one file's Parquet footer, cheap enough for the flow process): a set trained on
another dataset, with another preprocessing (ZCA on/off), for another model, or too short
for `max_start_epoch + expert_epochs` is refused. The files themselves are verified where
they are read, in the distillation task.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from distill.evaluate import EvalConfig
from distill.formats import write_distilled, write_metrics
from distill.matching import MatchConfig, MatchResult, check_experts, check_ipc, match_trajectories
from distill.trajectory import TrajectoryError, TrajectorySet, expert_file
from distill.transforms import Preprocessor
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import DatasetInfo, data_config, load_preprocessor, preprocessed
from tasks.evaluation import DistilledInfo, EvaluatedSet, MetricsTable
from tasks.experts import ExpertSetInfo
from tasks.runtime import task_device
from tasks.stage import Key, Publish, StageRun, stage
from tasks.store import Staging, artifact_key, work_dir

STAGE = "distill-tm"


class TMInfo(DistilledInfo):
    """Manifest fields of a distilled set made by trajectory matching."""

    learned_lr: float
    final_loss: float | None


class TMResult(BaseModel):
    """What trajectory matching on one dataset produced: its sets, how each was evaluated, the table."""

    model_config = ConfigDict(frozen=True)

    dataset: ArtifactRef
    experts: ArtifactRef
    distilled: dict[str, ArtifactRef]  # by tm_label
    sets: list[EvaluatedSet]  # every (distilled or random real set, evaluation net) in the table
    metrics: MetricsTable


def method_name(cfg: MatchConfig) -> str:
    """'mtt' with every AST switch off, else 'ast', then '+soft' / '+window' / '+ema' for the follow-up
    switches that are on (the label in tables; two entries of a flow differ in it or in ipc)."""
    ast = (
        cfg.init == "representative"
        or cfg.balance_loss
        or cfg.intermediate_loss != "none"
        or cfg.weight_perturb > 0
        or cfg.student_momentum > 0
    )
    switches = [
        ("+soft", cfg.soft_labels),
        ("+window", cfg.min_start_epoch > 0 or cfg.initial_max_start_epoch is not None),
        ("+ema", cfg.ema_decay > 0),
    ]
    return ("ast" if ast else "mtt") + "".join(tag for tag, on in switches if on)


def tm_method(cfg: MatchConfig) -> str:
    """The method column of a distilled set's metrics rows (and its `method` in the distilled format)."""
    return f"tm-{method_name(cfg)}"


def tm_label(cfg: MatchConfig) -> str:
    """One distilled set of a flow run: its method and images per class (a flow's entries must differ in it)."""
    return f"{method_name(cfg)}-ipc{cfg.ipc}"


def run_key(cfg: MatchConfig, experts: ArtifactRef, dataset: ArtifactRef) -> str:
    """What the images depend on (no iterations: a longer run resumes a shorter one's work dir)."""
    return artifact_key(STAGE + "-run", cfg.identity(), [experts.key, dataset.key])


def distilled_key(dataset: ArtifactRef, experts: ArtifactRef, cfg: MatchConfig, eval: EvalConfig) -> Key:
    # the whole config but follow-up switches at their defaults (left out as in MatchConfig.identity), so
    # sets published before those switches existed keep their keys
    match = {**cfg.identity(), "iterations": cfg.iterations, "checkpoint_every": cfg.checkpoint_every}
    return Key({"match": match, "eval": eval}, [experts.key, dataset.key])


def expert_set_meta(experts: ArtifactRef) -> tuple[dict[str, Any], int]:
    """(trajectory metadata, last epoch every expert reached) of a published set, from its manifest and one
    file's Parquet footer: nothing hashed, nothing copied (a paper-scale set is gigabytes)."""
    art = experts.open(verify=False)
    rows = ExpertSetInfo.of(art).experts
    first = art.file(expert_file(min(r["expert_id"] for r in rows)))
    with art.fs.open_input_file(first) as f:
        raw = (pq.read_schema(f).metadata or {}).get(b"distillery")
    if raw is None:
        raise TrajectoryError(f"{art.uri}/{expert_file(rows[0]['expert_id'])}: no `distillery` schema metadata")
    return json.loads(raw), min(int(r["epochs"]) for r in rows)


def check_expert_set(
    cfg: MatchConfig,
    experts: ArtifactRef,
    dataset: ArtifactRef,
    *,
    net: str | None = None,
    net_kwargs: dict | None = None,
    pre: Preprocessor | None = None,
) -> None:
    """Refuse an expert set not made for this dataset, preprocessing and model, or too short, from metadata
    alone (cheap enough for the flow process); the files are verified where they are read (`distill_tm`)."""
    info = DatasetInfo.of(dataset)
    check_ipc(info.class_counts["train"], cfg.ipc, info.class_names)
    pre = pre or load_preprocessor(dataset)
    meta, last_epoch = expert_set_meta(experts)
    check_experts(
        meta,
        last_epoch,
        cfg,
        num_classes=len(info.class_names),
        image_shape=info.image_shape,
        dataset_fingerprint=info.fingerprints["train"],
        preprocessor_fingerprint=pre.fingerprint(),
        net=net,
        net_kwargs=net_kwargs,
    )


@stage(STAGE, key=distilled_key, task_run_name="distill-tm-ipc{cfg.ipc}")
def distill_tm(
    dataset: ArtifactRef, experts: ArtifactRef, cfg: MatchConfig, eval: EvalConfig, store: str, run: StageRun
) -> Publish:
    """Distill `dataset` by matching `experts`' trajectories (resumable) and publish the set."""
    label = tm_label(cfg)
    pre = load_preprocessor(dataset)
    check_expert_set(cfg, experts, dataset, pre=pre)
    trajectories = TrajectorySet(experts.local_dir())  # verified: the parameters are read from these files
    info = DatasetInfo.of(dataset)
    train_x, train_y, names = preprocessed(dataset, "train", pre)
    result = match_trajectories(
        cfg,
        trajectories,
        train_x,
        train_y,
        num_classes=len(names),
        work_dir=work_dir(store, STAGE, run_key(cfg, experts, dataset)),
        device=task_device(),
        progress=reports.progress(f"distill {label}", "distill-tm", label),
        dataset_fingerprint=info.fingerprints["train"],
        preprocessor_fingerprint=pre.fingerprint(),
    )
    previews = pre.to_uint8(result.images)
    provenance = {
        "dataset": dataset.uri,
        "dataset_key": dataset.key,
        "data": data_config(dataset),
        "experts": experts.uri,
        "experts_key": experts.key,
        "expert_recipe": trajectories.meta.get("recipe"),
        "expert_ids": trajectories.expert_ids,
        "match": cfg.model_dump(mode="json"),
        "method": method_name(cfg),
        "iterations": len(result.losses),
        "final_loss": result.losses[-1] if result.losses else None,
        "rollbacks": result.rollbacks,
        "seconds": round(result.seconds, 1),
        "resumed_from": result.resumed_from,
    }
    _report(result, previews, names, label)
    reports.run_logger().info(
        "distilled %s: %d images, learned lr %.5g, loss %.4f -> %.4f in %.0f s%s",
        label,
        len(result.images),
        result.lr,
        result.losses[0],
        result.losses[-1],
        result.seconds,
        f" (resumed from iteration {result.resumed_from})" if result.resumed_from else "",
    )

    def write(staging: Staging) -> TMInfo:
        info = write_distilled(
            staging.path,
            pixels=result.images,
            labels=result.labels,
            class_names=names,
            preprocessor_config=pre.config(),
            preprocessor_tensors=pre.state_dict(),
            recipe=eval.recipe(result.lr),
            method=tm_method(cfg),
            provenance=provenance,
            previews=previews,
            soft_labels=result.soft_labels,
            learned_lr=result.lr,
            filesystem=staging.fs,
        )
        rows = [
            {"iteration": i + 1, "loss": loss, "lr": lr, "start_epoch": s}
            for i, (loss, lr, s) in enumerate(zip(result.losses, result.lrs, result.start_epochs))
        ]
        write_metrics(staging.file("loss.parquet"), rows, filesystem=staging.fs)
        return TMInfo(**info, learned_lr=result.lr, final_loss=provenance["final_loss"])

    return Publish(write, seeds={"match": cfg.seed})


def _report(result: MatchResult, previews, names: list[str], label: str) -> None:
    reports.markdown(
        f"## Distilled images ({label})\nOne row per class "
        f"({', '.join(names[:10])}{'...' if len(names) > 10 else ''}), "
        f"learned lr {result.lr:.5g}.\n\n"
        + reports.png_markdown(image_grid_png(previews, result.labels), "images")
        + "\n## Matching loss\n"
        + reports.png_markdown(loss_curve_png(result.losses), "matching loss"),
        key=reports.ui_key("distill-tm", label),
        description=f"distill-tm {label}: synthetic images and matching-loss curve",
    )


def image_grid_png(previews, labels, max_classes: int = 20, max_per_class: int = 10) -> bytes:
    """uint8 [N, C, H, W] previews as a grid: a row per class (at most 20), at most 10 per row."""
    import torch
    from PIL import Image

    rows = []
    classes = torch.unique(labels).tolist()[:max_classes]
    per_class = min(max_per_class, max(int((labels == c).sum()) for c in classes))
    for c in classes:
        imgs = previews[labels == c][:per_class]
        pad = torch.zeros((per_class - len(imgs), *imgs.shape[1:]), dtype=imgs.dtype)
        rows.append(torch.cat(list(torch.cat([imgs, pad]).permute(0, 2, 3, 1)), dim=1))  # [H, per_class*W, C]
    grid = torch.cat(rows, 0)  # [rows*H, per_class*W, C]
    if grid.shape[-1] == 1:
        grid = grid.expand(-1, -1, 3)
    scale = max(1, 256 // max(grid.shape[0], grid.shape[1] // 4, 1))
    size = (grid.shape[1] * scale, grid.shape[0] * scale)
    image = Image.fromarray(grid.contiguous().numpy()).resize(size, Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def loss_curve_png(losses: list[float]) -> bytes:
    plt = reports.pyplot()

    fig, ax = plt.subplots(figsize=(6, 3), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="per iteration")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="iteration", ylabel="normalized matching loss")
    ax.legend()
    return reports.figure_png(fig)

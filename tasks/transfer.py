"""Stages `pretrain`, `transfer` and `transfer-metrics`: pretrain on a source, transfer to a target.

Generic, for every stage that asks "how good is this (pruned, distilled) source for pretraining?":

- `pretrain_weights`: a fresh network trained on any image-dataset artifact (stage `dataset`,
  `pruned`, ...) for a fixed epoch budget; weights as safetensors, with images seen and wall
  time in the manifest. The head keeps every source class, pruned or not (as DP4TL's reference code, OPTML-Group/DP4TL).
- `transfer_eval`: the pretrained backbone (or a fresh one: the no-pretraining arm) on a target
  dataset artifact, by linear probe (frozen features, fresh linear head) and full fine-tune (fresh
  head, all weights), final-epoch test accuracy.
  Pretraining, probe and fine-tune are the shared recipe of distill.transfer (one TransferConfig);
  this module only loads artifacts, publishes and reports.
- `pretrain_transfer`: both in one Ray task, the unit a flow fans out per (method, ratio, seed).
  All four are `tasks.stage` bodies (`.fn` runs one as a plain function).
- `report_transfer`: metrics Parquet, a mean/std table and a plot of target accuracy vs pruning
  ratio per method, with the full-source and no-pretraining arms as reference lines.

Target images are resized to the pretrained input size when they differ (per-channel
normalization does not depend on the size; a ZCA-whitened target of another size is refused).
"""

from __future__ import annotations

import json
import math
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from distill.data import DataError, resize_uint8
from distill.evaluate import summarize
from distill.formats import read_metrics, write_metrics
from distill.fsio import read_bytes
from distill.train import evaluate
from distill.transfer import TransferConfig, backbone, pretrain, transfer
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import DatasetInfo, load_preprocessor, load_split, preprocessed
from tasks.evaluation import MetricsTable
from tasks.runtime import task_device
from tasks.stage import Key, Publish, StageInfo, StageRun, stage, stage_key
from tasks.store import Staging
from tasks.tables import markdown_table

PRETRAIN_STAGE = "pretrain"
TRANSFER_STAGE = "transfer"
METRICS_STAGE = "transfer-metrics"
WEIGHTS_FILE = "weights.safetensors"
FULL, SCRATCH = "full", "scratch"  # the comparison arms: the whole source, and no pretraining at all


# ---------------------------------------------------------------- pretraining


class PretrainInfo(StageInfo):
    """Manifest fields of a pretrained net: its shape and what pretraining cost."""

    rows: dict[str, int]
    num_classes: int
    image_shape: list[int]
    train_images: int
    images_seen: int
    pretrain_seconds: float
    pretrain_train_acc: float
    pretrain_source_test_acc: float
    device: str
    label: str  # of the run that made it (first writer wins: not part of the key)


class TransferInfo(StageInfo):
    rows: int
    metrics: dict[str, Any]  # the one metrics row (also in metrics.parquet)


def pretrain_key(dataset: ArtifactRef, cfg: TransferConfig, seed: int) -> Key:
    # Only the net and its pretraining recipe: a new probe or fine-tune recipe reuses the weights.
    return Key({"pretrain": cfg.pretraining(), "seed": seed}, [dataset.key])


@stage(PRETRAIN_STAGE, key=pretrain_key)
def pretrain_weights(
    dataset: ArtifactRef,
    cfg: TransferConfig,
    seed: int,
    store: str,
    run: StageRun,
    label: str = "",
    device: str | None = None,
) -> Publish:
    """Pretrain a fresh net on `dataset` (or reuse the stored one); publishes weights and cost."""
    info = DatasetInfo.of(dataset)
    names, shape = info.class_names, info.image_shape
    pre = load_preprocessor(dataset)
    x, y, _ = preprocessed(dataset, "train", pre)
    test_x, test_y, _ = preprocessed(dataset, "test", pre)
    progress = reports.progress(
        f"pretrain {label or dataset.key} seed {seed} ({len(y)} images)", "pretrain", label, "seed", seed
    )
    net, result = pretrain(
        cfg, x, y, loss="ce", out_dim=len(names), seed=seed, device=device, progress=progress, work_dir=run.work_dir()
    )
    source_test = evaluate(net, test_x, test_y, device=device) if len(test_y) else {"acc": float("nan")}
    meta = {
        "net": cfg.net,
        "net_kwargs": json.dumps(cfg.net_kwargs),
        "num_classes": str(len(names)),
        "image_shape": json.dumps(shape),
    }
    reports.run_logger().info(
        "pretrained %s seed %d on %d images in %.1f s", label, seed, len(y), result["pretrain_seconds"]
    )

    def write(staging: Staging) -> PretrainInfo:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        with staging.fs.open_output_stream(staging.file(WEIGHTS_FILE)) as f:
            f.write(safetensors.torch.save(state, metadata=meta))
        return PretrainInfo(
            rows={"train": int(len(y))},
            num_classes=len(names),
            image_shape=shape,
            train_images=int(len(y)),
            images_seen=result["images_seen"],
            pretrain_seconds=round(result["pretrain_seconds"], 3),
            pretrain_train_acc=result["pretrain_train_acc"],
            pretrain_source_test_acc=source_test["acc"],
            device=str(next(net.parameters()).device),
            label=label,
        )

    return Publish(write, seeds={"train": seed})


def load_pretrained(ref: ArtifactRef) -> tuple[nn.Module, dict[str, Any]]:
    """The stored pretrained net (CPU, eval mode) and its manifest."""
    art = ref.open()  # the weights are read: verified
    info = art.manifest
    cfg = TransferConfig(**info["config"]["pretrain"])
    net = backbone(cfg, info["image_shape"], info["num_classes"], 0)
    net.load_state_dict(safetensors.torch.load(read_bytes(art.fs, art.file(WEIGHTS_FILE))))
    return net.eval(), info


# ---------------------------------------------------------------- transfer


def transfer_key(pretrained: ArtifactRef | None, target: ArtifactRef, cfg: TransferConfig, seed: int) -> Key:
    upstream = [pretrained.key if pretrained is not None else SCRATCH, target.key]
    # The no-pretraining arm depends on the architecture; a pretrained one is named by its key.
    arch = {"net": cfg.net, "net_kwargs": cfg.net_kwargs} if pretrained is None else None
    return Key({"transfer": cfg.judging(), "seed": seed, "scratch_net": arch}, upstream)


def transfer_row(ref: ArtifactRef) -> dict[str, Any]:
    """The published metrics row, with the key that names it."""
    return {**TransferInfo.of(ref).metrics, "transfer_key": ref.key}


def target_tensors(target: ArtifactRef, shape: list[int]) -> tuple[torch.Tensor, ...]:
    """Target train/test in model input space at the backbone's input size: (train_x, train_y, test_x, test_y)."""
    pre = load_preprocessor(target)
    out = []
    for split in ("train", "test"):
        images = load_split(target, split)
        if len(images) == 0:
            raise DataError(f"the target's {split} split is empty ({target.uri})")
        x = images.images
        if list(x.shape[1:]) != list(shape):
            if pre.kind == "zca" or x.shape[1] != shape[0]:
                raise DataError(
                    f"target images are {list(x.shape[1:])} but the backbone takes {list(shape)}, and a "
                    f"{pre.kind} preprocessing cannot be resized; set the target's image_size to {shape[-1]}"
                )
            x = resize_uint8(x, shape[-1])
        out += [pre(x), images.labels]
    return tuple(out)


@stage(TRANSFER_STAGE, key=transfer_key, result=transfer_row)
def transfer_eval(
    pretrained: ArtifactRef | None,
    target: ArtifactRef,
    cfg: TransferConfig,
    seed: int,
    store: str,
    run: StageRun,
    label: str = "",
    device: str | None = None,
) -> Publish:
    """Linear probe and fine-tune of a pretrained (or, with None, a fresh) backbone on the target."""
    names = DatasetInfo.of(target).class_names
    if pretrained is None:
        shape = DatasetInfo.of(target).image_shape
        net, info = pretrain(cfg, None, None, loss="none", image_shape=shape, out_dim=len(names), seed=seed)
    else:
        net, info = load_pretrained(pretrained)
        shape = info["image_shape"]
    train_x, train_y, test_x, test_y = target_tensors(target, shape)
    row = transfer(
        net,
        train_x,
        train_y,
        test_x,
        test_y,
        cfg,
        num_classes=len(names),
        seed=seed,
        device=device,
        progress=lambda mode: reports.progress(f"{mode} {label} seed {seed}", mode, label, "seed", seed),
    )
    row.update(
        {
            "train_images": int(info.get("train_images", 0)),
            "images_seen": int(info["images_seen"]),
            "pretrain_seconds": float(info["pretrain_seconds"]),
            "target_train_images": int(len(train_y)),
        }
    )
    reports.run_logger().info(
        "transfer %s seed %d: %s", label, seed, {k: v for k, v in row.items() if k.endswith("acc")}
    )

    def write(staging: Staging) -> TransferInfo:
        write_metrics(staging.file("metrics.parquet"), [row], filesystem=staging.fs)
        return TransferInfo(rows=1, metrics=row)

    return Publish(write, seeds={"transfer": seed})


def pretrain_transfer_key(source: ArtifactRef | None, target: ArtifactRef, transfer: TransferConfig, seed: int) -> Key:
    """The transfer artifact's key, through the pretrained net's (None: the no-pretraining arm)."""
    pretrained = (
        None
        if source is None
        else ArtifactRef(
            store=source.store,
            stage=PRETRAIN_STAGE,
            key=stage_key(pretrain_weights, dataset=source, cfg=transfer, seed=seed),
        )
    )
    return transfer_key(pretrained, target, transfer, seed)


def arm_row(ref: ArtifactRef, method: str, ratio: float, seed: int, source: ArtifactRef | None) -> dict[str, Any]:
    """One row of the comparison: the arm's labels and its transfer metrics."""
    return {
        "method": method,
        "ratio": float(ratio),
        "seed": seed,
        **transfer_row(ref),
        "source": source.uri if source is not None else None,
    }


@stage(
    TRANSFER_STAGE,
    key=pretrain_transfer_key,
    publish=False,
    result=arm_row,
    task_name="pretrain-transfer",
    task_run_name="pretrain-transfer-{method}-{ratio}-seed{seed}",
)
def pretrain_transfer(
    source: ArtifactRef | None,
    target: ArtifactRef,
    transfer: TransferConfig,
    seed: int,
    store: str,
    method: str,
    ratio: float,
    run: StageRun,
) -> dict[str, Any]:
    """One Ray task: pretrain on `source` (None: no pretraining), then transfer to `target`; one metrics row.

    Both steps are the stage bodies above, run in this task (one Ray task per arm, not two)."""
    device = task_device()
    label = f"{method}-{ratio}" if method not in (FULL, SCRATCH) else method
    pre = None if source is None else pretrain_weights.fn(source, transfer, seed, store, label, device)
    transfer_eval.fn(pre, target, transfer, seed, store, label, device)
    return arm_row(run.ref, method, ratio, seed, source)


# ---------------------------------------------------------------- report


ACCURACIES = (("linear_probe_acc", "linear probe"), ("fine_tune_acc", "fine-tune"))


def summarize_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (method, ratio) of both accuracies, pretraining time and images seen."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    full = [r["pretrain_seconds"] for r in rows if r["method"] == FULL]
    full_s = sum(full) / len(full) if full else float("nan")
    out = []
    for (method, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        entry: dict[str, Any] = {"method": method, "ratio": ratio, "seeds": len(rs)}
        for k, _ in ACCURACIES:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                s = summarize(vals)
                entry[f"{k}_mean"], entry[f"{k}_std"] = s["mean"], s["std"]
        secs = sum(r["pretrain_seconds"] for r in rs) / len(rs)
        entry["pretrain_seconds"] = secs
        entry["pretrain_time_vs_full"] = secs / full_s if full_s and not math.isnan(full_s) else float("nan")
        entry["train_images"] = rs[0]["train_images"]
        entry["images_seen"] = rs[0]["images_seen"]
        out.append(entry)
    return out


def accuracy_plot(summary: list[dict[str, Any]]) -> bytes:
    """Target accuracy vs pruning ratio, one line per method, full source and scratch as dashed lines."""
    plt = reports.pyplot()

    modes = [(k, t) for k, t in ACCURACIES if any(f"{k}_mean" in s for s in summary)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 3.6), dpi=110, squeeze=False)
    methods = sorted({s["method"] for s in summary} - {FULL, SCRATCH})
    for ax, (k, title) in zip(axes[0], modes):
        for method in methods:
            pts = sorted((s["ratio"], s[f"{k}_mean"], s[f"{k}_std"]) for s in summary if s["method"] == method)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        for arm, style in ((FULL, "--"), (SCRATCH, ":")):
            ref = [s for s in summary if s["method"] == arm and f"{k}_mean" in s]
            if ref:
                ax.axhline(
                    ref[0][f"{k}_mean"],
                    color="k",
                    linestyle=style,
                    label=f"{arm} source" if arm == FULL else "no pretraining",
                )
        ax.set(title=f"target {title} accuracy", xlabel="fraction of source classes pruned", ylabel="test accuracy")
    axes[0][-1].legend(fontsize=8)
    return reports.figure_png(fig)


class TransferMetricsInfo(StageInfo):
    rows: int
    summary: list[dict[str, Any]]


def metrics_key(rows: list[dict[str, Any]], name: str) -> Key:
    return Key({"name": name}, sorted(r["transfer_key"] for r in rows))


def show_metrics(ref: ArtifactRef, name: str) -> MetricsTable:
    """The published table and accuracy-vs-ratio plot, shown in this flow run's UI (a cache hit shows them too)."""
    art = ref.open()
    summary = read_metrics(art.file("summary.parquet"), filesystem=art.fs)
    png = read_bytes(art.fs, art.file("accuracy.png"))
    reports.table(
        summary,
        key=reports.ui_key(name, "summary"),
        description=f"{name}: target accuracy (final epoch), mean and std over seeds. Metrics: {art.uri}",
    )
    reports.markdown(
        "## Target accuracy vs pruning ratio\nMean and std over seeds; dashed: full-source pretraining, "
        "dotted: no pretraining.\n\n" + reports.png_markdown(png, "accuracy vs ratio") + "\n" + markdown_table(summary),
        key=reports.ui_key(name, "plot"),
    )
    return MetricsTable(summary=summary, ref=ref)


@stage(METRICS_STAGE, key=metrics_key, result=show_metrics, cache=False, task_name="report-transfer")
def report_transfer(rows: list[dict[str, Any]], name: str, store: str, run: StageRun) -> Publish:
    """Metrics and summary Parquet and the accuracy-vs-ratio plot (PNG)."""
    summary = summarize_rows(rows)
    png = accuracy_plot(summary)

    def write(staging: Staging) -> TransferMetricsInfo:
        # write_metrics wants flat scalars; the summary is already flat, the rows too.
        write_metrics(staging.file("metrics.parquet"), rows, filesystem=staging.fs)
        write_metrics(staging.file("summary.parquet"), summary, filesystem=staging.fs)
        with staging.fs.open_output_stream(staging.file("accuracy.png")) as f:
            f.write(png)
        return TransferMetricsInfo(rows=len(rows), summary=summary)

    return Publish(write)

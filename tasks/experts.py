"""Stage `experts`: train a pool of expert trajectories, one Ray task per expert.

Each expert trains in a work directory that outlives the task (`<store>/.work/...` for a
local store, the local cache for a remote one) under a deterministic file name, so a
crashed or retried task resumes from the expert's last epoch checkpoint. When every expert
of a set is done, `publish_experts` publishes the set as one artifact: the expert files
(hard links on a local disk, copies elsewhere), `experts.parquet` with each expert's final
metrics and smoothness summaries, and `smoothness.png`. The set's key is (stage, expert
config, dataset key), so every expert task of a finished set is a cache hit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from prefect import task

from distill.experts import ExpertConfig, smoothness, train_expert
from distill.formats import write_metrics
from distill.trajectory import TrajectoryReader, expert_file
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import DatasetInfo, load_preprocessor, preprocessed
from tasks.runtime import task_device
from tasks.stage import Key, Publish, StageInfo, StageRun, stage
from tasks.store import ArtifactStore, Staging

STAGE = "experts"


class ExpertSetInfo(StageInfo):
    """Manifest fields of an expert set: every expert's final metrics and smoothness, the shared recipe."""

    rows: int
    experts: list[dict[str, Any]]  # one per expert: expert_id, epochs (the last stored), accuracies, smoothness
    recipe: dict[str, Any]  # ExpertConfig.expert_recipe()
    compute_s: float  # the experts trained in their own tasks: the set's cost is their summed training time


def set_key(dataset: ArtifactRef, cfg: ExpertConfig) -> Key:
    return Key(cfg, [dataset.key])


def expert_row(ref: ArtifactRef, expert_id: int) -> dict[str, Any]:
    """One expert's final metrics, from the published set's manifest."""
    return next(r for r in ExpertSetInfo.of(ref).experts if r["expert_id"] == expert_id)


@stage(
    STAGE,
    key=set_key,
    publish=False,
    result=expert_row,
    task_name="train-expert",
    task_run_name="expert-{cfg.recipe}-{expert_id}",
)
def train_one_expert(
    dataset: ArtifactRef, cfg: ExpertConfig, expert_id: int, store: str, run: StageRun
) -> dict[str, Any]:
    """Train (or resume) one expert of a set in the set's work directory; returns its final metrics."""
    device = task_device()
    pre = load_preprocessor(dataset)
    train_x, train_y, names = preprocessed(dataset, "train", pre)
    test_x, test_y, _ = preprocessed(dataset, "test", pre)
    progress = reports.progress(f"expert {cfg.recipe} #{expert_id}", "expert", cfg.recipe, expert_id)
    summary = train_expert(
        cfg,
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=len(names),
        expert_id=expert_id,
        out_path=run.work_dir() / expert_file(expert_id),
        dataset_fingerprint=DatasetInfo.of(dataset).fingerprints["train"],
        preprocessor_fingerprint=pre.fingerprint(),
        device=device,
        progress=progress,
    )
    reports.run_logger().info(
        "expert %s #%d: test acc %.4f after %d epochs (%.0f s%s)",
        cfg.recipe,
        expert_id,
        summary["test_acc"],
        summary["epochs"],
        summary["seconds"],
        f", resumed from epoch {summary['resumed_from']}" if summary["resumed_from"] else "",
    )
    summary.pop("path")
    return summary


@stage(STAGE, key=set_key, task_name="publish-experts", task_run_name="publish-experts-{cfg.recipe}")
def publish_experts(
    dataset: ArtifactRef, cfg: ExpertConfig, store: str, summaries: list[dict[str, Any]], run: StageRun
) -> Publish:
    """Publish a finished set: expert files, per-expert metrics and smoothness, a plot."""
    work = run.work_dir()
    rows, curves = [], []
    for s in sorted(summaries, key=lambda r: r["expert_id"]):
        with TrajectoryReader(work / expert_file(s["expert_id"])) as reader:
            sm = smoothness(reader)
        rows.append({**{k: v for k, v in s.items() if k not in ("resumed_from", "reused")}, **_scalars(sm)})
        curves.append(_curves_of(sm))
    local = ArtifactStore(store).local

    def write(staging: Staging) -> ExpertSetInfo:
        for s in rows:
            _place(work / expert_file(s["expert_id"]), staging, expert_file(s["expert_id"]), local)
        write_metrics(staging.file("experts.parquet"), rows, filesystem=staging.fs)
        with staging.fs.open_output_stream(staging.file("smoothness.png")) as f:
            f.write(smoothness_png({cfg.recipe: curves}))
        compute_s = round(sum(float(r.get("seconds") or 0.0) for r in rows), 3)
        return ExpertSetInfo(rows=len(rows), experts=rows, recipe=cfg.expert_recipe(), compute_s=compute_s)

    return Publish(write, seeds={"experts": cfg.seed})


@task(name="report-experts", result_serializer="json")
def report_experts(sets: list[ArtifactRef], name: str) -> list[dict[str, Any]]:
    """Table of every expert's final accuracy, and MTT-vs-AST smoothness side by side (PNG)."""
    rows, curves = [], {}
    for ref in sets:
        info = ExpertSetInfo.of(ref)
        recipe = info.recipe["recipe"]
        rows += [{"recipe": recipe, **_table_row(r)} for r in info.experts]
        local = ref.local_dir()
        curves[recipe] = [_curves(local / expert_file(r["expert_id"])) for r in info.experts]
    reports.table(rows, key=reports.ui_key(name, "experts"), description=f"{name}: final accuracy per expert")
    png = smoothness_png(curves)
    reports.markdown(
        "## Expert smoothness\nParameter change per epoch and training loss, mean over experts "
        "(shaded: min to max). Smoother (AST) experts move at an even pace with a steadily "
        "falling loss.\n\n" + reports.png_markdown(png, "smoothness") + "\n" + _summary_table(rows),
        key=reports.ui_key(name, "smoothness"),
    )
    return rows


def _place(src: Path, staging: Staging, name: str, local: bool) -> None:
    """Hard-link on a local store (no second copy of large trajectories), stream-copy elsewhere."""
    dest = staging.file(name)
    if local:
        os.link(src, dest)
        return
    with open(src, "rb") as f, staging.fs.open_output_stream(dest) as out:
        shutil.copyfileobj(f, out, length=1 << 20)


def _scalars(sm: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sm.items() if not isinstance(v, list)}


def _table_row(r: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "expert_id",
        "epochs",
        "train_acc",
        "test_acc",
        "mean_param_change",
        "param_change_cv",
        "loss_roughness",
        "seconds",
    )
    return {k: r.get(k) for k in keys}


def _summary_table(rows: list[dict[str, Any]]) -> str:
    from distill.evaluate import summarize
    from tasks.tables import markdown_table

    recipes = sorted({r["recipe"] for r in rows})
    out = []
    for recipe in recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        entry = {"recipe": recipe, "experts": len(mine)}
        for k in ("test_acc", "param_change_cv", "loss_roughness"):
            vals = [r[k] for r in mine if r.get(k) is not None]
            s = summarize(vals)
            entry[f"{k} (mean)"], entry[f"{k} (std)"] = s["mean"], s["std"]
        out.append(entry)
    return markdown_table(out)


def _curves_of(sm: dict[str, Any]) -> dict[str, list[float]]:
    return {k: sm[k] for k in ("epochs", "param_change", "train_loss")}


def _curves(path: Path) -> dict[str, list[float]]:
    with TrajectoryReader(path) as reader:
        return _curves_of(smoothness(reader))


def smoothness_png(curves: dict[str, list[dict[str, list[float]]]]) -> bytes:
    """Two panels (parameter change per epoch, training loss), one line per recipe."""
    plt = reports.pyplot()
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    for recipe, experts in sorted(curves.items()):
        for ax, metric in zip(axes, ("param_change", "train_loss")):
            n = min(len(e[metric]) for e in experts)
            values = np.array([e[metric][:n] for e in experts], dtype=float)
            epochs = experts[0]["epochs"][:n]
            line = ax.plot(epochs, values.mean(0), label=f"{recipe} ({len(experts)} experts)")[0]
            ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    axes[0].set(title="parameter change per epoch (L2)", xlabel="epoch")
    axes[1].set(title="training loss (plain CE)", xlabel="epoch")
    axes[1].legend()
    return reports.figure_png(fig)

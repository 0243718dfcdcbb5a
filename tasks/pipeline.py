"""Stage `pipeline-report`: one table and one plot comparing every path of the pipeline and its baselines.

Each row is one (path, method): its final-epoch target accuracy (mean and std over seeds),
the training data it needed (images and bytes on disk), and the cost of producing it: the
summed wall time of every stage artifact on its chain (from their manifests) and the
highest process memory any of those stages reached. Costs come from manifests, so a warm
re-run reports the cost of the run that made each artifact, not of the cache lookup.
"""

from __future__ import annotations

from typing import Any, Iterable

from prefect import task

from distill.formats import write_metrics
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.matching import TMResult
from tasks.store import ArtifactStore, Staging
from tasks.tables import markdown_table

STAGE = "pipeline-report"


def stage_seconds(manifest: dict[str, Any]) -> float:
    """What producing an artifact cost: the compute a stage declared (e.g. experts trained in other
    tasks), else the publishing task run's duration, else the write alone."""
    for key in ("compute_s", "task_s", "wall_time_s"):
        if manifest.get(key) is not None:
            return float(manifest[key])
    return 0.0


def chain_cost(refs: Iterable[ArtifactRef | None]) -> dict[str, float | None]:
    """Summed stage time and peak memory (MiB) over the artifacts a result was made from."""
    wall, peak = 0.0, None
    for ref in refs:
        if ref is None:
            continue
        m = ref.open(verify=False).manifest
        wall += stage_seconds(m)
        rss = m.get("peak_rss_mb")
        if rss is not None:
            peak = rss if peak is None else max(peak, rss)
    return {"wall_s": round(wall, 1), "peak_rss_mb": peak}


def data_bytes(ref: ArtifactRef | None, files: tuple[str, ...] = ()) -> int:
    """Bytes on disk of an artifact's data files (all of them, or only those under `files` prefixes)."""
    if ref is None:
        return 0
    listed = ref.open(verify=False).manifest.get("files", {})
    return sum(v["bytes"] for k, v in listed.items() if not files or k.startswith(files))


def accuracy_bars(rows: list[dict[str, Any]]) -> bytes:
    """Horizontal bars: each path's mean target accuracy with its std, one panel per metric."""
    plt = reports.pyplot()

    metrics = [m for m in ("linear_probe", "fine_tune", "test") if any(r.get(f"{m}_acc_mean") is not None for r in rows)]
    labels = [f"{r['path']}: {r['method']}" for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 0.45 * len(rows) + 1.6), dpi=110,
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        mean = [r.get(f"{metric}_acc_mean") or 0.0 for r in rows]
        std = [r.get(f"{metric}_acc_std") or 0.0 for r in rows]
        colors = ["tab:blue" if r["kind"] == "method" else "tab:gray" for r in rows]
        ax.barh(range(len(rows)), mean, xerr=std, color=colors, capsize=3)
        ax.set(title=f"target {metric.replace('_', ' ')} accuracy", xlabel="accuracy (final epoch)")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
    return reports.figure_png(fig)


def tm_rows(result: TMResult) -> list[dict[str, Any]]:
    """One report row per (set, evaluation net) of a trajectory-matching run: distilled sets and their baselines."""
    sets = {(s.method, s.setting): s for s in result.sets}
    rows = []
    for summary in result.metrics.summary:
        evaluated = sets[(summary["method"], summary["setting"])]
        rows.append({
            "path": f"experts -> TM on target ({evaluated.setting})", "method": evaluated.method,
            "kind": "baseline" if evaluated.baseline else "method",
            "linear_probe_acc_mean": None, "linear_probe_acc_std": None, "fine_tune_acc_mean": None,
            "fine_tune_acc_std": None, "test_acc_mean": summary["test_acc_mean"], "test_acc_std": summary["test_acc_std"],
            "seeds": summary["seeds"], "data_mib": round(data_bytes(evaluated.made_from[-1], ("data/",)) / 2**20, 3),
            **chain_cost(evaluated.made_from),
        })
    return rows


@task(name="pipeline-report", result_serializer="json")
def report_pipeline(rows: list[dict[str, Any]], notes: list[str], name: str, store: str, inputs: list[str]) -> dict[str, Any]:
    """Publish the comparison (Parquet), show it as a table, a bar plot and the run's notes in the UI."""
    key = ArtifactStore(store).key(STAGE, {"name": name, "rows": rows, "notes": notes}, inputs)

    def write(staging: Staging) -> dict[str, Any]:
        write_metrics(staging.file("report.parquet"), rows, filesystem=staging.fs)
        return {"rows": len(rows), "notes": notes}

    art = ArtifactStore(store).publish(STAGE, key, write, config={"name": name}, inputs=inputs)
    reports.table(rows, key=reports.ui_key(name, "report"),
                  description=f"{name}: every path and its baselines; accuracy = final epoch, mean and std over "
                  f"seeds; wall time and peak memory summed/maxed over the stages that made it. Data: {art.uri}")
    text = f"# {name}\n\n" + "".join(f"- {n}\n" for n in notes) + "\n" + markdown_table(rows) + "\n\n"
    text += reports.png_markdown(accuracy_bars(rows), "target accuracy per path (blue: method, grey: baseline)")
    reports.markdown(text, key=reports.ui_key(name, "report-plot"), description=f"{name}: report and plot")
    reports.run_logger().info("\n%s", markdown_table(rows))
    return {"rows": rows, "notes": notes, "report_uri": art.uri}


def selection_note(selection_ref: ArtifactRef, ratio: float) -> str:
    """Why the pruned source looks as it does: how many classes were kept and how many earned target votes."""
    from dp4tl.formats import read_selection
    from dp4tl.methods import num_kept_classes

    art = selection_ref.open(verify=False)
    method = art.manifest.get("method", "?")
    if "selection.parquet" not in art.manifest["files"]:  # data-wise selectors keep samples, not classes
        return f"source pruned by {method} at ratio {ratio} (a per-sample selection at the matched image budget)"
    selection, names, _ = read_selection(art.file("selection.parquet"), filesystem=art.fs)
    n = selection.num_classes
    kept = num_kept_classes(ratio, n)
    kept_ids = selection.ranking[:kept]
    voted = int((selection.votes[kept_ids] > 0).sum())
    note = (f"{method} kept {kept} of {n} source classes (pruning ratio {ratio}); {voted} of the kept classes "
            f"received target votes (top: {', '.join(names[c] for c in kept_ids[:3].tolist())})")
    if voted < kept:
        note += (f"; the other {kept - voted} had no vote and were ranked by the selector's tie-break score, so the "
                 "target maps onto fewer source classes than were kept")
    return note

"""Stage `pipeline-report`: one table and one plot comparing every path of the pipeline and its baselines.

Each row is one (path, method): its final-epoch target accuracy (mean and std over seeds),
the training data it needed (images and bytes on disk), and the cost of producing it: the
summed wall time of every stage artifact on its chain (from their manifests) and the
highest process memory any of those stages reached. Costs come from manifests, so a warm
re-run reports the cost of the run that made each artifact, not of the cache lookup.

The rows are built here, inside the report task, from the paths' typed results
(`PipelineResults`); the flow only hands them over.
"""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict

from distill.formats import read_metrics, write_metrics
from distill.krr import METHODS
from distill.ranking import FULL_REAL
from dp4tl.methods import get_method
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.evaluation import MetricsTable
from tasks.krr import KRRResult
from tasks.matching import TMResult
from tasks.stage import Key, Manifest, Publish, StageInfo, StageRun, stage
from tasks.store import Staging
from tasks.tables import path_report, pct_diff
from tasks.transfer import ACCURACIES, FULL, SCRATCH

STAGE = "pipeline-report"


class TransferPath(BaseModel):
    """The transfer path's results: the pruning chain, KRR-ST on the pruned source and, when run, DP4TL's
    comparison (pretraining on the pruned source, the full source and nothing; tasks.transfer)."""

    model_config = ConfigDict(frozen=True)

    chain: list[ArtifactRef]  # source, surrogate, selection, pruned source (the artifacts before KRR-ST)
    selection: ArtifactRef
    ratio: float
    krr: KRRResult
    dp4tl: MetricsTable | None = None


class PipelineResults(BaseModel):
    """What the pipeline's paths produced (a path switched off is None)."""

    model_config = ConfigDict(frozen=True)

    transfer: TransferPath | None = None
    target: TMResult | None = None

    def metrics_keys(self) -> list[str]:
        keys = [r.metrics.ref.key for r in (self.transfer and self.transfer.krr, self.target) if r is not None]
        return keys + ([self.transfer.dp4tl.ref.key] if self.transfer and self.transfer.dp4tl else [])


class ReportInfo(StageInfo):
    rows: int
    notes: list[str]


class PipelineReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    rows: list[dict[str, Any]]
    notes: list[str]
    report_uri: str


def chain_cost(refs: Iterable[ArtifactRef | None]) -> dict[str, float | None]:
    """Summed stage time and peak memory (MiB) over the artifacts a result was made from."""
    wall, peak = 0.0, None
    for ref in refs:
        if ref is None:
            continue
        m = Manifest.of(ref)
        wall += m.cost_s()
        if m.peak_rss_mb is not None:
            peak = m.peak_rss_mb if peak is None else max(peak, m.peak_rss_mb)
    return {"wall_s": round(wall, 1), "peak_rss_mb": peak}


def data_bytes(ref: ArtifactRef | None, files: tuple[str, ...] = ()) -> int:
    """Bytes on disk of an artifact's data files (all of them, or only those under `files` prefixes)."""
    if ref is None:
        return 0
    return sum(v.bytes for k, v in Manifest.of(ref).files.items() if not files or k.startswith(files))


_EMPTY = {
    "linear_probe_acc_mean": None,
    "linear_probe_acc_std": None,
    "fine_tune_acc_mean": None,
    "fine_tune_acc_std": None,
    "test_acc_mean": None,
    "test_acc_std": None,
}


DP4TL_PATH = "prune -> pretrain -> transfer (DP4TL)"


def _transfer_row(
    path: str, method: str, kind: str, summary: dict[str, Any], data: int, cost: dict[str, float | None]
) -> dict[str, Any]:
    """A report row of a transfer comparison: linear-probe and fine-tune accuracy from its summary row."""
    accuracies = {f"{k}_{stat}": summary.get(f"{k}_{stat}") for k, _ in ACCURACIES for stat in ("mean", "std")}
    return {
        "path": path,
        "method": method,
        "kind": kind,
        **_EMPTY,
        **accuracies,
        "seeds": summary["seeds"],
        "data_mib": round(data / 2**20, 3),
        **cost,
    }


def krr_rows(path: TransferPath) -> list[dict[str, Any]]:
    """One report row per compared method of the transfer path (KRR-ST and its baselines)."""
    chain, teacher, distilled = path.chain, path.krr.teacher, path.krr.distilled
    distilled_bytes = data_bytes(distilled, ("data/",))
    rows = []
    for s in path.krr.metrics.summary:
        spec = METHODS[s["method"]]
        # what each arm's pretraining data cost to produce; the random-real arms pretrain on as many
        # images as the distilled set (with teacher targets, or labels), the teacher saw the pruned source
        made_from = {
            "distilled": chain + [teacher, distilled],
            "teacher": chain + [teacher],
            "none": [],
            "initial": chain + [teacher] if spec.loss == "mse" else chain,
        }[spec.data]
        data = {"none": 0, "teacher": data_bytes(chain[-1])}.get(spec.data, distilled_bytes)
        kind = "method" if spec.data == "distilled" else "baseline"
        rows.append(_transfer_row("prune -> KRR-ST -> transfer", s["method"], kind, s, data, chain_cost(made_from)))
    return rows


def dp4tl_rows(path: TransferPath) -> list[dict[str, Any]]:
    """DP4TL's comparison: the pruned source against the full source and no pretraining (same recipe and
    epoch budget; the pruned source's cost includes the surrogate and selection that made it)."""
    if path.dp4tl is None:
        return []
    source, pruned = path.chain[0], path.chain[-1]
    rows = []
    for s in path.dp4tl.summary:
        method = s["method"]
        if method == FULL:
            label, kind, made_from, data = "full source", "baseline", [source], data_bytes(source, ("train",))
        elif method == SCRATCH:
            label, kind, made_from, data = "no pretraining", "baseline", [], 0
        else:
            unit = "images" if get_method(method).data_wise else "classes"
            label, kind, made_from = f"{method} (pruned {100 * s['ratio']:.0f}% of {unit})", "method", path.chain
            data = data_bytes(pruned, ("train",))
        cost = chain_cost(made_from)
        cost["wall_s"] = round(cost["wall_s"] + s["pretrain_seconds"], 1)  # plus the (mean) pretraining itself
        rows.append(_transfer_row(DP4TL_PATH, label, kind, s, data, cost))
    order = {"method": 0, "baseline": 1}
    return sorted(rows, key=lambda r: order[r["kind"]])


def regime_note(path: TransferPath) -> list[str]:
    """Whether source pretraining matters at all in this regime: the full source against no pretraining."""
    if path.dp4tl is None:
        return []
    by = {s["method"]: s for s in path.dp4tl.summary}
    if FULL not in by or SCRATCH not in by:
        return []
    parts = [f"{label} {pct_diff(by[FULL], by[SCRATCH], key)}" for key, label in ACCURACIES]
    return [
        "source pretraining in this regime (full source minus no pretraining, points): " + "; ".join(parts) + " "
        "(pruning can only matter where this gap is large)"
    ]


def tm_rows(result: TMResult) -> list[dict[str, Any]]:
    """One report row per (set, evaluation net) of a trajectory-matching run: distilled sets and their baselines."""
    sets = {(s.method, s.setting, s.labels): s for s in result.sets}
    rows = []
    for summary in result.metrics.summary:
        evaluated = sets[(summary["method"], summary["setting"], summary.get("labels") or "hard")]
        rows.append(
            {
                "path": f"experts -> TM on target ({evaluated.setting})",
                "method": evaluated.method + (" (soft labels)" if evaluated.labels == "soft" else ""),
                "kind": "baseline" if evaluated.baseline else "method",
                **_EMPTY,
                "test_acc_mean": summary["test_acc_mean"],
                "test_acc_std": summary["test_acc_std"],
                "seeds": summary["seeds"],
                # a distilled-format set keeps its pixels under data/; the full real set is the dataset's train split
                "data_mib": round(data_bytes(evaluated.made_from[-1], _data_files(evaluated.method)) / 2**20, 3),
                **chain_cost(evaluated.made_from),
            }
        )
    return rows


def _data_files(method: str) -> tuple[str, ...]:
    return ("train",) if method == FULL_REAL else ("data/",)


def selection_note(selection_ref: ArtifactRef, ratio: float) -> str:
    """Why the pruned source looks as it does: how many classes were kept and how many earned target votes."""
    from dp4tl.formats import read_selection
    from dp4tl.methods import num_kept_classes

    art = selection_ref.open(verify=False)
    method = art.manifest.get("method", "?")
    if "selection.parquet" not in art.manifest["files"]:  # data-wise selectors keep samples, not classes
        return f"source pruned by {method} at ratio {ratio} (a per-sample selection at the matched image budget)"
    art = selection_ref.open()  # the votes are read from the file: verified
    selection, names, _ = read_selection(art.file("selection.parquet"), filesystem=art.fs)
    n = selection.num_classes
    kept = num_kept_classes(ratio, n)
    kept_ids = selection.ranking[:kept]
    voted = int((selection.votes[kept_ids] > 0).sum())
    note = (
        f"{method} kept {kept} of {n} source classes (pruning ratio {ratio}); {voted} of the kept classes "
        f"received target votes (top: {', '.join(names[c] for c in kept_ids[:3].tolist())})"
    )
    if voted < kept:
        note += (
            f"; the other {kept - voted} had no vote and were ranked by the selector's tie-break score, so the "
            "target maps onto fewer source classes than were kept"
        )
    return note


def report_rows(results: PipelineResults) -> list[dict[str, Any]]:
    transfer = dp4tl_rows(results.transfer) + krr_rows(results.transfer) if results.transfer else []
    return transfer + (tm_rows(results.target) if results.target else [])


def ranking_note(result: TMResult) -> list[str]:
    """DD-Ranking's scores of each distilled set, in words (accuracy points; LRS in [0, 1], higher is better)."""
    out = []
    for r in result.metrics.ranking:
        if r.get("lrs") is None:
            out.append(f"DD-Ranking {r['method']} {r['setting']}: not scored (missing {r['missing']})")
            continue
        out.append(
            f"DD-Ranking {r['method']} {r['setting']} ({r['own_labels']} labels): HLR {100 * r['hlr']:.1f} points "
            f"below full real, IOR {100 * r['ior']:+.1f} points over random real, LRS {r['lrs']:.3f}"
        )
    return out


def report_notes(results: PipelineResults, notes: list[str]) -> list[str]:
    """The plan's notes (e.g. a resized target), then what the run itself explains (the pruned source,
    the distilled sets' DD-Ranking scores)."""
    path = results.transfer
    notes = notes + ([selection_note(path.selection, path.ratio), *regime_note(path)] if path is not None else [])
    return notes + (ranking_note(results.target) if results.target is not None else [])


def report_key(results: PipelineResults, notes: list[str], name: str) -> Key:
    # the report's content: a re-made upstream artifact (another cost) makes another report
    rows, notes = report_rows(results), report_notes(results, notes)
    return Key({"name": name, "rows": rows, "notes": notes}, results.metrics_keys())


def accuracy_bars(rows: list[dict[str, Any]]) -> bytes:
    """Horizontal bars: each path's mean target accuracy with its std, one panel per metric."""
    plt = reports.pyplot()

    metrics = [
        m for m in ("linear_probe", "fine_tune", "test") if any(r.get(f"{m}_acc_mean") is not None for r in rows)
    ]
    labels = [f"{r['path']}: {r['method']}" for r in rows]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.2 * len(metrics), 0.45 * len(rows) + 1.6), dpi=110, squeeze=False, sharey=True
    )
    for ax, metric in zip(axes[0], metrics):
        mean = [r.get(f"{metric}_acc_mean") or 0.0 for r in rows]
        std = [r.get(f"{metric}_acc_std") or 0.0 for r in rows]
        colors = ["tab:blue" if r["kind"] == "method" else "tab:gray" for r in rows]
        ax.barh(range(len(rows)), mean, xerr=std, color=colors, capsize=3)
        ax.set(title=f"target {metric.replace('_', ' ')} accuracy", xlabel="accuracy (final epoch)")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
    return reports.figure_png(fig)


def show_report(ref: ArtifactRef, name: str) -> PipelineReport:
    """The published report as a table, a bar plot and the run's notes in this flow run's UI."""
    art = ref.open()
    rows = read_metrics(art.file("report.parquet"), filesystem=art.fs)
    notes = ReportInfo.of(art).notes
    reports.table(
        rows,
        key=reports.ui_key(name, "report"),
        description=f"{name}: every path and its baselines; accuracy = final epoch, mean and std over "
        f"seeds; wall time and peak memory summed/maxed over the stages that made it. Data: {art.uri}",
    )
    reports.run_logger().info("\n%s", path_report(rows))
    return PipelineReport(rows=rows, notes=notes, report_uri=art.uri)


def headline_report(report: PipelineReport, name: str) -> None:
    """The report a person reads, created by the flow itself (not a task) so that it heads the flow
    run's Artifacts tab: the notes, one table per path with verdicts against each baseline, the plot."""
    text = f"# {name}\n\n" + "".join(f"- {n}\n" for n in report.notes) + "\n" + path_report(report.rows) + "\n\n"
    text += reports.png_markdown(accuracy_bars(report.rows), "target accuracy per path (blue: method, grey: baseline)")
    reports.markdown(
        text,
        key=reports.ui_key(name, "report-plot"),
        description=f"{name}: per-path report, verdicts and plot (data: {report.report_uri})",
    )


@stage(STAGE, key=report_key, result=show_report, cache=False)
def report_pipeline(results: PipelineResults, notes: list[str], name: str, store: str, run: StageRun) -> Publish:
    """Publish the comparison of every path (Parquet) with the notes that explain the run."""
    rows, notes = report_rows(results), report_notes(results, notes)

    def write(staging: Staging) -> ReportInfo:
        write_metrics(staging.file("report.parquet"), rows, filesystem=staging.fs)
        return ReportInfo(rows=len(rows), notes=notes)

    return Publish(write)

"""Flow `pipeline`: curate data for a target task end to end, every stage cached, one final report.

Two paths for a (source, target) pair, side by side:

1. transfer path: prune the source for the target (DP4TL) -> train a self-supervised teacher
   on the pruned source -> distill it with KRR-ST -> pretrain a fresh network on the
   distilled set -> transfer to the target (linear probe, fine-tune), next to KRR-ST's
   baselines (no pretraining, random real images with teacher targets or labels, the teacher);
2. target path: expert trajectories on the target -> trajectory matching (MTT/AST) -> train
   fresh networks on the distilled target, next to the random real subset at the same size.

Every stage is a task keyed by its content address, so a re-run, or a run that changes only
a downstream parameter, reuses what is done. The final report (table + bar plot in the UI,
Parquet in the store) lists the accuracy, wall time, peak memory and data size of every path
and baseline, plus notes that explain the run (resized targets, how many source classes the
target actually maps onto).

Run it:
    make demo                                            # pipeline/cpu through a deployment
    prefect deployment run pipeline/cpu --watch
    python -m flows.pipeline --preset tiny               # in-process, without a deployment
"""

from __future__ import annotations

import contextvars
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.data import DataConfig, DataError
from distill.transfer import TransferConfig
from dp4tl.methods import PruneMethodName, SelectionConfig, check_ratio, get_method, num_kept_classes
from dp4tl.surrogate import SurrogateConfig
from flows.distill_krr import KRRStage, run_krr
from flows.distill_tm import TMStage, run_tm
from flows.presets import build_config, flow_params, start
from tasks.artifacts import ArtifactRef
from tasks.datasets import materialize_dataset, validate_data
from tasks.pipeline import PipelineResults, TransferPath, headline_report, report_pipeline
from tasks.prune import materialize_pruned, report_selection, select, surrogate
from tasks.runtime import Resources, heavy, ray_task_runner
from tasks.transfer import FULL, SCRATCH, pretrain_transfer, report_transfer


class PruneStage(BaseModel):
    """DP4TL as the pipeline's first stage: one method at one ratio (prune-eval compares them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: PruneMethodName = Field(
        "lm", description=("Pruning method (dp4tl.methods): lm, lm_soft, fm, fm_kmeans, random, lm_bottom, moderate.")
    )
    ratio: float = Field(0.5, description="Fraction of source classes pruned, in (0, 1).")
    seed: int = Field(0, description="Seed of the selection (random methods, K-means).")
    surrogate: SurrogateConfig = Field(
        default_factory=SurrogateConfig, description="Surrogate trained on the full source."
    )
    surrogate_weights: str | None = Field(
        None, description="Your surrogate weights (safetensors) instead of training one."
    )
    k_clusters: int | None = Field(None, ge=1, description="fm_kmeans groups; default the number of source classes.")
    transfer: TransferConfig | None = Field(
        None,
        description="DP4TL's own comparison: pretrain a fresh net on the pruned source, on the full source and "
        "not at all, then transfer each to the target (distill.transfer: linear probe and fine-tune); null skips it.",
    )
    transfer_seeds: int = Field(2, ge=1, description="Seeds of that comparison (pretraining and transfer).")

    @model_validator(mode="after")
    def _valid(self) -> PruneStage:
        get_method(self.method)
        check_ratio(self.ratio)
        return self

    def selection(self) -> SelectionConfig:
        return SelectionConfig(
            methods=[self.method], ratios=[self.ratio], seeds=[self.seed], k_clusters=self.k_clusters
        )


class TargetTMStage(TMStage):
    """Trajectory matching on the pipeline's target, evaluated beside the random real subset."""

    data: DataConfig | None = Field(
        None, description="The target as trajectory matching reads it (e.g. 32 px with ZCA, as MTT); default: `target`."
    )


class PipelineConfig(BaseModel):
    """Parameters of the `pipeline` flow (a validated form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: DataConfig = Field(description="The large source to prune and distill for pretraining (Tiny-ImageNet).")
    target: DataConfig = Field(description="The downstream task (CIFAR-10): drives the pruning, judges every path.")
    prune: PruneStage = Field(default_factory=PruneStage, description="DP4TL source pruning.")
    krr: KRRStage | None = Field(
        default_factory=KRRStage,
        description="Transfer path (teacher, KRR-ST, transfer comparison on the pruned source); null skips it.",
    )
    tm: TargetTMStage | None = Field(None, description="Target path (experts + trajectory matching); null skips it.")
    resources: Resources = Field(default_factory=Resources, description="Ray resources per heavy task.")
    store: str | None = Field(None, description="Artifact store URI; default $DISTILLERY_STORE or ./artifacts.")

    @model_validator(mode="after")
    def _stages_agree(self) -> PipelineConfig:
        if self.krr is None and self.tm is None:
            raise ValueError("both paths are switched off (krr and tm are null); enable at least one")
        if self.krr is not None:
            if self.source.zca or self.target.zca:
                raise ValueError(
                    "the transfer path (KRR-ST) works on normalized images; set zca: false on source "
                    "and target (ZCA is a trajectory-matching option: set it on tm.data)"
                )
            if not self.krr.methods or "krr-st" not in self.krr.methods:
                raise ValueError(f"krr.methods must include 'krr-st' (the distilled set); got {self.krr.methods}")
        return self

    def transfer_target(self) -> tuple[DataConfig, str | None]:
        """The target as the transfer path sees it: at the source's image size (and a note when resized)."""
        s, t = self.source.image_size, self.target.image_size
        if s == t:
            return self.target, None
        note = (
            f"target images resized from {t if t is not None else 'native'} px to the source's {s} px for the "
            "transfer path (pruning and pretraining share one input size); the target path keeps its own size"
        )
        return self.target.model_copy(update={"image_size": s}), note


def check_plan(config: PipelineConfig) -> None:
    """Refuse, from label columns alone and before any stage runs, settings the data cannot satisfy."""
    source = validate_data(config.source)[config.source.train_split]
    target = validate_data(config.target)[config.target.train_split]
    if sum(target) == 0:
        raise DataError(f"the target's {config.target.train_split!r} split selects no images ({config.target.source})")
    classes = [n for n in source if n > 0]
    check_ratio(config.prune.ratio, len(classes))
    if config.krr is not None:
        # the smallest possible pruned source: the kept classes are the smallest ones
        kept = num_kept_classes(config.prune.ratio, len(classes))
        least = sum(sorted(classes)[:kept])
        if config.krr.krr.num_images > least:
            raise ValueError(
                f"krr.krr.num_images={config.krr.krr.num_images} synthetic images, but pruning {config.prune.ratio} of "
                f"{len(classes)} source classes may leave only {least} images; lower num_images or the ratio"
            )
    if config.tm is not None:
        validate_data(config.tm.data or config.target, max(m.ipc for m in config.tm.distill))


def _transfer_path(
    config: PipelineConfig, source: ArtifactRef, target: ArtifactRef, store: str, name: str
) -> TransferPath:
    """Prune the source for the target -> teacher -> KRR-ST -> pretrain -> transfer, with KRR-ST's baselines;
    beside it (when `prune.transfer` is set) DP4TL's comparison: pretrain on the pruned source, the full source
    and nothing, then transfer each to the target."""
    assert config.krr is not None
    prune = config.prune
    seeds = range(prune.transfer_seeds) if prune.transfer is not None else range(0)
    with heavy(config.resources, "transfer"):
        # DP4TL's comparison arms that need no selection first: they fill the CPUs the surrogate leaves idle
        arms = [
            pretrain_transfer.submit(data, target, prune.transfer, seed, store, method, 0.0)
            for seed in seeds
            for data, method in ((source, FULL), (None, SCRATCH))
        ]
    with heavy(config.resources, "surrogate"):
        sur = surrogate.submit(source, prune.surrogate, store, prune.surrogate_weights).result()
    with heavy(config.resources, "selection"):
        selection = select.submit(source, target, sur, prune.method, prune.seed, prune.selection(), store).result()
    report_selection([selection], f"{name}-selection", 10)
    pruned = materialize_pruned(source, selection, prune.ratio, store)
    with heavy(config.resources, "transfer"):
        # before KRR-ST's stages, so these Ray tasks fill the CPUs its serial stages leave idle
        arms += [
            pretrain_transfer.submit(pruned, target, prune.transfer, seed, store, prune.method, prune.ratio)
            for seed in seeds
        ]
    krr = run_krr(pruned, target, config.krr, config.resources, store, f"{name}-krr-st")
    dp4tl = report_transfer([a.result() for a in arms], f"{name}-dp4tl", store) if arms else None
    return TransferPath(
        chain=[source, sur, selection, pruned], selection=selection, ratio=prune.ratio, krr=krr, dp4tl=dp4tl
    )


@flow(name="pipeline", task_runner=ray_task_runner(), log_prints=True)
def pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Prune -> teacher -> KRR-ST -> pretrain -> transfer, and experts -> TM on the target; one report."""
    store = start(config.store, config.resources)
    check_plan(config)  # in the flow process: a conflict fails here, before any stage starts
    transfer_target, resize_note = config.transfer_target()
    name = f"pipeline-{config.source.name}-to-{config.target.name}"

    paths: dict[str, Callable[[], Any]] = {}
    if config.krr is not None:
        source_f = materialize_dataset.submit(config.source, store)
        target_f = materialize_dataset.submit(transfer_target, store)
        paths["transfer"] = lambda: _transfer_path(config, source_f.result(), target_f.result(), store, name)
    if config.tm is not None:
        tm_f = materialize_dataset.submit(config.tm.data or config.target, store)
        paths["target"] = lambda: run_tm(tm_f.result(), config.tm, config.resources, store, f"{name}-tm")
    # The two paths share no stage: run them side by side, so the target path's experts and
    # evaluations fill the CPUs (or GPUs) that the transfer path's serial stages leave idle.
    # Each thread runs in a copy of this flow run's context, so its tasks belong to this run.
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        futures = {k: pool.submit(contextvars.copy_context().run, p) for k, p in paths.items()}
        results = PipelineResults(**{k: f.result() for k, f in futures.items()})
    report = report_pipeline.submit(results, [resize_note] if resize_note else [], name, store).result()
    headline_report(report, name)  # in the flow run itself, so it heads the Artifacts tab
    print("\n".join(report.notes) + f"\nreport: {report.report_uri}")
    return report.model_dump()


def main() -> None:
    _, params = flow_params("pipeline", doc=__doc__)
    report = pipeline(build_config(PipelineConfig, params))
    # the last line of output: the report as JSON (benchmarks/pipeline.py reads it)
    print(
        json.dumps({"results": report["rows"], "notes": report["notes"], "report": report["report_uri"]}, default=str)
    )


if __name__ == "__main__":
    main()

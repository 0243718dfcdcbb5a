"""Flow `distill-tm`: trajectory-matching distillation (MTT, AST switches), evaluated honestly.

validate -> dataset -> expert set (trained here, one Ray task per expert, or an already
published set named by `experts_key`, checked against the dataset's fingerprints) ->
one distillation per entry of `distill` (one Ray task each, checkpointed and resumable)
-> every distilled set and the random real subset at the same images per class trained by
N fresh networks of every architecture in `eval` (one Ray task per network; final-epoch
accuracy), on hard labels and, with `ranking`, also on soft labels (the set's own; the
experts' logits for the random subset), beside the full real training set -> metrics
Parquet, a mean/std table and DD-Ranking's HLR / IOR / LRS per distilled set. The distilled sets are published in the
distilled-dataset format (learned lr, recipe, preprocessing, provenance), with their image
grid and matching-loss curve as artifacts in the Prefect UI.

Run it:
    prefect deployment run distill-tm/cpu --watch
    python -m flows.distill_tm --preset tiny     # in-process, without a deployment
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.data import DataConfig
from distill.evaluate import EvalConfig
from distill.experts import ExpertConfig
from distill.matching import MatchConfig
from distill.ranking import FULL_REAL, HARD, SOFT, full_setting
from flows.presets import build_config, flow_params, start
from tasks.artifacts import ArtifactRef
from tasks.datasets import materialize_dataset, validate_data
from tasks.evaluation import (
    RANDOM_REAL,
    EvaluatedSet,
    RankingConfig,
    collect_metrics,
    evaluate_distilled,
    evaluate_full_real,
    random_subset,
    setting,
    soft_subset,
)
from tasks.experts import STAGE as EXPERTS_STAGE
from tasks.experts import publish_experts, train_one_expert
from tasks.matching import TMResult, check_expert_set, distill_tm, tm_label, tm_method
from tasks.runtime import Resources, heavy, ray_task_runner
from tasks.store import ArtifactStore


class TMStage(BaseModel):
    """What trajectory matching does to a labelled dataset: experts, distilled sets, evaluation (also
    the `tm` block of the pipeline)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: ExpertConfig = Field(description="Expert trajectories to match (trained unless experts_key is given).")
    experts_key: str | None = Field(
        None,
        description="Key of a published expert set to reuse instead of training one; it must have been "
        "made for this dataset, preprocessing and model (refused otherwise).",
    )
    distill: list[MatchConfig] = Field(
        min_length=1, description="One distilled set per entry (its own ipc and hyperparameters, as in MTT's table)."
    )
    eval: list[EvalConfig] = Field(
        min_length=1,
        description="Evaluation recipes, one per architecture (ConvNet, ResNet-18); the first is "
        "stored with the distilled sets. Distilled and random real sets are evaluated identically.",
    )
    subset_seed: int = Field(0, description="Seed of the random real subsets (the baseline).")
    ranking: RankingConfig | None = Field(
        default_factory=RankingConfig,
        description="DD-Ranking's extra evaluations (soft-label baselines, the full real set) and scores; "
        "null: accuracy with hard labels only.",
    )

    @field_validator("distill")
    @classmethod
    def _distinct(cls, entries: list[MatchConfig]) -> list[MatchConfig]:
        labels = [tm_label(m) for m in entries]
        if len(set(labels)) != len(labels):
            raise ValueError(f"each distill entry needs its own (method, ipc) label; got {labels}")
        return entries

    @field_validator("eval")
    @classmethod
    def _distinct_nets(cls, evals: list[EvalConfig]) -> list[EvalConfig]:
        nets = [e.net for e in evals]
        if len(set(nets)) != len(nets):
            raise ValueError(f"one eval recipe per architecture; got nets {nets}")
        return evals

    @model_validator(mode="after")
    def _segments_fit_the_experts(self) -> TMStage:
        if self.experts_key is None:
            for m in self.distill:
                if m.max_start_epoch + m.expert_epochs > self.experts.epochs:
                    raise ValueError(
                        f"{tm_label(m)}: max_start_epoch + expert_epochs = {m.max_start_epoch} + {m.expert_epochs} "
                        f"exceeds the experts' {self.experts.epochs} epochs; lower them or train longer experts"
                    )
        return self


class DistillTMConfig(TMStage):
    """Parameters of the `distill-tm` flow (a validated form in the Prefect UI)."""

    data: DataConfig = Field(description="The labelled dataset to distill, and its preprocessing (zca: MTT's ZCA).")
    resources: Resources = Field(
        default_factory=Resources, description="Ray resources per expert/distillation/eval task."
    )
    store: str | None = Field(None, description="Artifact store URI; default $DISTILLERY_STORE or ./artifacts.")


def _expert_set(stage: TMStage, resources: Resources, dataset: ArtifactRef, store: str) -> ArtifactRef:
    if stage.experts_key is not None:
        if not ArtifactStore(store).exists(EXPERTS_STAGE, stage.experts_key):
            raise ValueError(f"no published expert set {stage.experts_key!r} in {store}/{EXPERTS_STAGE}")
        return ArtifactRef(store=store, stage=EXPERTS_STAGE, key=stage.experts_key)
    cfg = stage.experts
    with heavy(resources, "experts"):
        runs = [train_one_expert.submit(dataset, cfg, i, store) for i in range(cfg.num_experts)]
    return publish_experts.submit(dataset, cfg, store, [r.result() for r in runs]).result()


def run_tm(dataset: ArtifactRef, stage: TMStage, resources: Resources, store: str, name: str) -> TMResult:
    """Experts, distilled sets and the comparison table for a materialized dataset (inside a flow)."""
    experts = _expert_set(stage, resources, dataset, store)
    for m in stage.distill:  # a mismatched or too-short expert set is refused before any distillation
        check_expert_set(m, experts, dataset, net=stage.experts.net, net_kwargs=stage.experts.net_kwargs)
    with heavy(resources, "distill-tm"):
        futures = {tm_label(m): distill_tm.submit(dataset, experts, m, stage.eval[0], store) for m in stage.distill}
    distilled = {label: f.result() for label, f in futures.items()}
    rank = stage.ranking
    soft = rank is not None and rank.soft_baseline
    sets, runs = [], []

    def evaluate(ref: ArtifactRef, method: str, where: str, ev: EvalConfig, labels: str, chain: list) -> None:
        baseline = method == RANDOM_REAL
        sets.append(EvaluatedSet(method=method, setting=where, baseline=baseline, made_from=chain, labels=labels))
        runs.extend(
            evaluate_distilled.submit(ref, dataset, ev, s, store, method, where, labels=labels)
            for s in range(ev.num_models)
        )

    with heavy(resources, "eval"):
        for m in stage.distill:
            ref = distilled[tm_label(m)]
            for ev in stage.eval:
                evaluate(ref, tm_method(m), setting(m.ipc, ev.net), ev, HARD, [dataset, experts, ref])
                if m.soft_labels and soft:
                    evaluate(ref, tm_method(m), setting(m.ipc, ev.net), ev, SOFT, [dataset, experts, ref])
        for ipc in sorted({m.ipc for m in stage.distill}):
            for ev in stage.eval:
                subset = random_subset.submit(dataset, ipc, stage.subset_seed, ev, store).result()
                evaluate(subset, RANDOM_REAL, setting(ipc, ev.net), ev, HARD, [dataset, subset])
                if soft:
                    labelled = soft_subset.submit(subset, experts, store).result()
                    evaluate(labelled, RANDOM_REAL, setting(ipc, ev.net), ev, SOFT, [dataset, experts, labelled])
    if rank is not None and rank.full_real:
        with heavy(resources, "eval-real"):
            for ev in stage.eval:
                sets.append(
                    EvaluatedSet(method=FULL_REAL, setting=full_setting(ev.net), baseline=True, made_from=[dataset])
                )
                runs.extend(
                    evaluate_full_real.submit(dataset, ev, s, rank.full_real_epochs, store)
                    for s in range(ev.num_models)
                )
    table = collect_metrics.submit([r.result() for r in runs], name, store).result()
    return TMResult(dataset=dataset, experts=experts, distilled=distilled, sets=sets, metrics=table)


@flow(name="distill-tm", task_runner=ray_task_runner(), log_prints=True)
def distill_tm_flow(config: DistillTMConfig) -> dict[str, Any]:
    """Distill by trajectory matching, evaluate beside the random real baseline, report mean/std."""
    store = start(config.store, config.resources)
    validate_data(config.data, max(m.ipc for m in config.distill))  # fails fast: ipc larger than a class
    dataset = materialize_dataset.submit(config.data, store).result()
    result = run_tm(dataset, config, config.resources, store, f"distill-tm-{config.data.name}")
    out = {
        "summary": result.metrics.summary,
        "ranking": result.metrics.ranking,
        "metrics_uri": result.metrics.ref.uri,
        "distilled": {label: ref.uri for label, ref in result.distilled.items()},
        "experts_uri": result.experts.uri,
        "dataset_uri": dataset.uri,
    }
    print(
        json.dumps(
            {
                "summary": out["summary"],
                "ranking": out["ranking"],
                "metrics": out["metrics_uri"],
                "distilled": out["distilled"],
                "experts": out["experts_uri"],
            },
            indent=1,
        )
    )
    return out


def main() -> None:
    _, params = flow_params("distill-tm", doc=__doc__)
    distill_tm_flow(build_config(DistillTMConfig, params))


if __name__ == "__main__":
    main()

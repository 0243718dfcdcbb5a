"""Flow `distill-tm`: trajectory-matching distillation (MTT, AST switches), evaluated honestly.

validate -> dataset -> expert set (trained here, one Ray task per expert, or an already
published set named by `experts_key`, checked against the dataset's fingerprints) ->
one distillation per entry of `distill` (one Ray task each, checkpointed and resumable)
-> every distilled set and the random real subset at the same images per class trained by
N fresh networks of every architecture in `eval` (one Ray task per network; final-epoch
accuracy) -> metrics Parquet and a mean/std table. The distilled sets are published in the
distilled-dataset format (learned lr, recipe, preprocessing, provenance), with their image
grid and matching-loss curve as artifacts in the Prefect UI.

Run it:
    prefect deployment run distill-tm/cpu --watch
    python -m flows.distill_tm --preset tiny     # in-process, without a deployment
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.data import DataConfig
from distill.evaluate import EvalConfig
from distill.experts import ExpertConfig
from distill.matching import MatchConfig
from flows.presets import load_preset, resolve_store
from tasks.artifacts import ArtifactRef
from tasks.datasets import materialize_dataset, validate_data
from tasks.evaluation import collect_metrics, evaluate_distilled, random_subset
from tasks.experts import STAGE as EXPERTS_STAGE
from tasks.experts import publish_experts, train_one_expert
from tasks.matching import check_expert_set, distill_tm, method_name
from tasks.runtime import Resources, heavy, ray_task_runner
from tasks.store import ArtifactStore


class TMStage(BaseModel):
    """What trajectory matching does to a labelled dataset: experts, distilled sets, evaluation (also
    the `tm` block of the pipeline)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experts: ExpertConfig = Field(description="Expert trajectories to match (trained unless experts_key is given).")
    experts_key: str | None = Field(
        None, description="Key of a published expert set to reuse instead of training one; it must have been "
        "made for this dataset, preprocessing and model (refused otherwise)."
    )
    distill: list[MatchConfig] = Field(
        min_length=1, description="One distilled set per entry (its own ipc and hyperparameters, as in MTT's table)."
    )
    eval: list[EvalConfig] = Field(
        min_length=1, description="Evaluation recipes, one per architecture (ConvNet, ResNet-18); the first is "
        "stored with the distilled sets. Distilled and random real sets are evaluated identically."
    )
    subset_seed: int = Field(0, description="Seed of the random real subsets (the baseline).")

    @field_validator("distill")
    @classmethod
    def _distinct(cls, entries: list[MatchConfig]) -> list[MatchConfig]:
        labels = [label(m) for m in entries]
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
                        f"{label(m)}: max_start_epoch + expert_epochs = {m.max_start_epoch} + {m.expert_epochs} "
                        f"exceeds the experts' {self.experts.epochs} epochs; lower them or train longer experts"
                    )
        return self


class DistillTMConfig(TMStage):
    """Parameters of the `distill-tm` flow (a validated form in the Prefect UI)."""

    data: DataConfig = Field(description="The labelled dataset to distill, and its preprocessing (zca: MTT's ZCA).")
    resources: Resources = Field(default_factory=Resources, description="Ray resources per expert/distillation/eval task.")
    store: str | None = Field(None, description="Artifact store URI; default $DISTILLERY_STORE or ./artifacts.")


def label(m: MatchConfig) -> str:
    return f"{method_name(m)}-ipc{m.ipc}"


def _expert_set(config: DistillTMConfig, dataset: ArtifactRef, store: str) -> ArtifactRef:
    if config.experts_key is not None:
        if not ArtifactStore(store).exists(EXPERTS_STAGE, config.experts_key):
            raise ValueError(f"no published expert set {config.experts_key!r} in {store}/{EXPERTS_STAGE}")
        return ArtifactRef(store=store, stage=EXPERTS_STAGE, key=config.experts_key)
    cfg = config.experts
    with heavy(config.resources):
        runs = [train_one_expert.submit(dataset, cfg, i, store) for i in range(cfg.num_experts)]
    return publish_experts.submit(dataset, cfg, store, [r.result() for r in runs]).result()


def run_tm(dataset: ArtifactRef, config: DistillTMConfig, store: str, name: str) -> dict[str, Any]:
    """Experts, distilled sets and the comparison table for a materialized dataset (inside a flow)."""
    experts = _expert_set(config, dataset, store)
    for m in config.distill:  # a mismatched or too-short expert set is refused before any distillation
        check_expert_set(m, experts, dataset, net=config.experts.net, net_kwargs=config.experts.net_kwargs)
    primary = config.eval[0]
    with heavy(config.resources):
        futures = {label(m): distill_tm.submit(dataset, experts, m, primary, store, label(m)) for m in config.distill}
    distilled = {name: f.result() for name, f in futures.items()}

    runs = []
    with heavy(config.resources):
        for m in config.distill:
            for ev in config.eval:
                setting = f"ipc{m.ipc}/{ev.net}"
                runs += [evaluate_distilled.submit(distilled[label(m)], dataset, ev, s, store, f"tm-{method_name(m)}",
                                                   setting) for s in range(ev.num_models)]
        subsets = {}
        for ipc in sorted({m.ipc for m in config.distill}):
            for ev in config.eval:
                subset = subsets[f"ipc{ipc}/{ev.net}"] = random_subset.submit(
                    dataset, ipc, config.subset_seed, ev, store).result()
                runs += [evaluate_distilled.submit(subset, dataset, ev, s, store, "random-real", f"ipc{ipc}/{ev.net}")
                         for s in range(ev.num_models)]
    rows = [r.result() for r in runs]
    result = collect_metrics.submit(rows, name, store).result()
    return {**result, "distilled": {n: ref.uri for n, ref in distilled.items()}, "distilled_refs": distilled,
            "subset_refs": subsets, "experts": experts, "experts_uri": experts.uri, "dataset_uri": dataset.uri}


@flow(name="distill-tm", task_runner=ray_task_runner(), log_prints=True)
def distill_tm_flow(config: DistillTMConfig) -> dict[str, Any]:
    """Distill by trajectory matching, evaluate beside the random real baseline, report mean/std."""
    store = resolve_store(config.store)
    validate_data(config.data, max(m.ipc for m in config.distill))  # fails fast: ipc larger than a class
    dataset = materialize_dataset.submit(config.data, store).result()
    result = run_tm(dataset, config, store, f"distill-tm-{config.data.name}")
    print(json.dumps({"summary": result["summary"], "metrics": result["metrics_uri"], "distilled": result["distilled"],
                      "experts": result["experts_uri"]}, indent=1))
    return {k: v for k, v in result.items() if k not in ("distilled_refs", "subset_refs", "experts")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="preset in deployments/presets/distill-tm.yaml")
    args = parser.parse_args()
    distill_tm_flow(DistillTMConfig(**load_preset("distill-tm", args.preset)))


if __name__ == "__main__":
    main()

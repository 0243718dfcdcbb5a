"""Flow `distill-krr`: self-supervised dataset distillation (KRR-ST) and its transfer comparison.

source dataset -> Barlow Twins teacher (cached per source + teacher config) -> KRR-ST distilled
set (images + learned target representations, distilled-dataset Parquet) -> for every method
(KRR-ST and its baselines: no pretraining, random real images with teacher targets, the same
images with cross-entropy on their labels, the teacher itself) and seed, one Ray task that
pretrains a fresh student and transfers it to the target by linear probe and fine-tuning ->
metrics Parquet and a mean/std table in the Prefect UI, plus the image grid and loss curve.

`run_krr` takes the source as a dataset ArtifactRef (the layout tasks.datasets.materialize_dataset
writes), so a pipeline can hand it a DP4TL-pruned source unchanged.

Run it:
    prefect deployment run 'distill-krr/cpu' --watch
    python -m flows.distill_krr --preset tiny      # in-process, without a deployment
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

from distill.data import DataConfig
from distill.krr import METHODS, KRRConfig, check_methods, krr_transfer
from distill.ssl import SSLConfig
from distill.transfer import TransferConfig
from flows.presets import build_config, flow_params, start
from tasks.artifacts import ArtifactRef
from tasks.datasets import materialize_dataset, validate_data
from tasks.krr import (
    KRRResult,
    check_inputs,
    check_num_images,
    distill_krr_st,
    evaluate_method,
    report_distilled,
    report_metrics,
    train_teacher_task,
)
from tasks.runtime import Resources, heavy, ray_task_runner

MethodName = METHODS.name_type()  # a drop-down of the compared methods in the run form


class KRRStage(BaseModel):
    """What KRR-ST does to a source: teacher, distillation and the transfer comparison (also the
    `krr` block of the pipeline)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    teacher: SSLConfig = Field(default_factory=SSLConfig, description="Barlow Twins teacher training.")
    krr: KRRConfig = Field(default_factory=KRRConfig, description="KRR-ST distillation.")
    transfer: TransferConfig = Field(
        default_factory=krr_transfer,
        description="Pretraining + transfer recipe (distill.transfer), shared by all methods.",
    )
    methods: list[MethodName] = Field(
        default_factory=lambda: list(METHODS),
        min_length=1,
        description=f"Compared methods: any of {', '.join(METHODS)}.",
    )
    seeds: int = Field(3, ge=1, description="Evaluation seeds per method (mean and std over these).")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        check_methods(methods)
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods must not repeat; got {methods}")
        return methods


class DistillKRRConfig(KRRStage):
    """Parameters of the `distill-krr` flow (a validated form in the Prefect UI)."""

    source: DataConfig = Field(
        description="The source to distill (its labels are used only by the random-real-ce "
        "baseline): Tiny-ImageNet-200 at 32x32, a subset."
    )
    target: DataConfig = Field(description="The labelled transfer target (CIFAR-10), same image size as the source.")
    resources: Resources = Field(default_factory=Resources, description="Ray resources per heavy task.")
    store: str | None = Field(None, description="Artifact store URI; default $DISTILLERY_STORE or ./artifacts.")


def run_krr(
    source: ArtifactRef, target: ArtifactRef, stage: KRRStage, resources: Resources, store: str, name: str
) -> KRRResult:
    """Teacher, distilled set and comparison table for a materialized source and target (inside a flow)."""
    check_inputs(source, target, stage.krr, stage.methods)  # from manifests: before any training
    # nothing runs beside these two: they may take every core
    with heavy(resources.serial(), "ssl-teacher"):
        teacher = train_teacher_task.submit(source, stage.teacher, store).result()
    with heavy(resources.serial(), "krr-st"):
        distilled = distill_krr_st.submit(source, teacher, stage.krr, stage.transfer, store).result()
    grid = report_distilled.submit(distilled, name)
    with heavy(resources, "krr-eval"):
        runs = [
            evaluate_method.submit(method, seed, source, teacher, distilled, target, stage.transfer, store)
            for method in stage.methods
            for seed in range(stage.seeds)
        ]
    rows = [r.result() for r in runs]
    grid.result()
    table = report_metrics.submit(rows, name, store).result()
    return KRRResult(source=source, target=target, teacher=teacher, distilled=distilled, metrics=table)


@flow(name="distill-krr", task_runner=ray_task_runner(), log_prints=True)
def distill_krr_flow(config: DistillKRRConfig) -> dict[str, Any]:
    """KRR-ST: teacher, distilled set, and transfer accuracy of KRR-ST vs its baselines (mean/std over seeds)."""
    store = start(config.store, config.resources)
    # In the flow process, from label columns only: fails fast, before anything is decoded or trained.
    counts = validate_data(config.source)
    check_num_images(config.krr, sum(counts[config.source.train_split]), config.source.source)
    validate_data(config.target)
    source = materialize_dataset.submit(config.source, store).result()
    target = materialize_dataset.submit(config.target, store).result()
    result = run_krr(
        source, target, config, config.resources, store, f"krr-st-{config.source.name}-to-{config.target.name}"
    )
    out = {
        "summary": result.metrics.summary,
        "metrics_uri": result.metrics.ref.uri,
        "distilled_uri": result.distilled.uri,
        "teacher_uri": result.teacher.uri,
    }
    print(
        json.dumps(
            {
                "summary": out["summary"],
                "metrics": out["metrics_uri"],
                "distilled": out["distilled_uri"],
                "teacher": out["teacher_uri"],
            },
            indent=1,
        )
    )
    return out


def main() -> None:
    _, params = flow_params("distill-krr", doc=__doc__)
    distill_krr_flow(build_config(DistillKRRConfig, params))


if __name__ == "__main__":
    main()

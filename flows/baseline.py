"""Flow `baseline`: the random-real-subset baseline, end to end through every layer.

dataset -> seeded random real subset at k images per class (stored in the distilled-dataset
format, recipe included) -> N fresh networks trained on it, one Ray task each -> metrics
Parquet and a mean/std table in the Prefect UI. Every distillation method is compared with
this flow's number at the same k, under the same evaluation recipe.

Run it:
    DISTILLERY_DEMO=baseline/cpu make demo      # deploys everything and runs baseline/cpu
    prefect deployment run baseline/tiny --watch
    python -m flows.baseline --preset tiny      # in-process, without a deployment
    python -m flows.baseline --preset cpu --data /path/to/my_dataset --set ipc=5
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from distill.data import DataConfig
from distill.evaluate import EvalConfig
from flows.presets import build_config, flow_params, start
from tasks.datasets import materialize_dataset, validate_data
from tasks.evaluation import collect_metrics, evaluate_distilled, random_subset
from tasks.runtime import Resources, heavy, ray_task_runner


class BaselineConfig(BaseModel):
    """Parameters of the `baseline` flow (a validated form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataConfig = Field(description="The labelled dataset (train and test splits) and its preprocessing.")
    ipc: int = Field(10, ge=1, description="Real images per class in the subset (the distillation budget).")
    subset_seed: int = Field(0, description="Seed of the random subset; the evaluation seeds are 0..num_models-1.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation recipe shared with every method.")
    resources: Resources = Field(default_factory=Resources, description="Ray resources per evaluation run.")
    store: str | None = Field(None, description="Artifact store URI; default $DISTILLERY_STORE or ./artifacts.")


@flow(name="baseline", task_runner=ray_task_runner(), log_prints=True)
def baseline(config: BaselineConfig) -> dict[str, Any]:
    """Random real subset at k images per class, evaluated by N fresh networks (mean and std)."""
    store = start(config.store, config.resources)
    validate_data(config.data, config.ipc)  # in the flow process: fails fast, before any Ray worker starts
    dataset = materialize_dataset.submit(config.data, store).result()
    subset = random_subset.submit(dataset, config.ipc, config.subset_seed, config.eval, store).result()
    setting = f"ipc{config.ipc}"
    with heavy(config.resources, "eval"):
        runs = [
            evaluate_distilled.submit(subset, dataset, config.eval, seed, store, "random-real", setting)
            for seed in range(config.eval.num_models)
        ]
    rows = [r.result() for r in runs]
    table = collect_metrics.submit(rows, f"baseline-{config.data.name}-{setting}", store).result()
    print(json.dumps({"summary": table.summary, "metrics": table.ref.uri, "subset": subset.uri}, indent=1))
    return {
        "summary": table.summary,
        "metrics_uri": table.ref.uri,
        "subset_uri": subset.uri,
        "dataset_uri": dataset.uri,
    }


def main() -> None:
    _, params = flow_params("baseline", doc=__doc__)
    baseline(build_config(BaselineConfig, params))


if __name__ == "__main__":
    main()

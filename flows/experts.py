"""Flow `experts`: expert trajectories for trajectory matching, one Ray task per expert.

For each recipe in `experts` (e.g. MTT and AST side by side): N experts trained on the
dataset, each saving its parameters after every epoch (Parquet, one file per expert),
then published as one expert set; finally a table of final accuracies and a plot of
parameter change and training loss per epoch that shows how smooth each recipe's
trajectories are.

Run it:
    prefect deployment run experts/tiny --watch
    python -m flows.experts --preset tiny      # in-process, without a deployment
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

from distill.data import DataConfig
from distill.experts import ExpertConfig
from flows.presets import build_config, flow_params, start
from tasks.datasets import materialize_dataset, validate_data
from tasks.experts import publish_experts, report_experts, train_one_expert
from tasks.runtime import Resources, heavy, ray_task_runner


class ExpertsConfig(BaseModel):
    """Parameters of the `experts` flow (a validated form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataConfig = Field(description="The labelled dataset the experts train on (and are tested on).")
    experts: list[ExpertConfig] = Field(
        min_length=1, description="One expert set per entry, e.g. recipes mtt and ast to compare their smoothness."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Ray resources per expert; fractional GPUs pack small experts."
    )
    store: str | None = Field(None, description="Artifact store URI; default $DISTILLERY_STORE or ./artifacts.")

    @field_validator("experts")
    @classmethod
    def _distinct(cls, experts: list[ExpertConfig]) -> list[ExpertConfig]:
        recipes = [e.recipe for e in experts]
        if len(set(recipes)) != len(recipes):
            raise ValueError(f"each expert set needs its own recipe (they label the report); got {recipes}")
        return experts


@flow(name="experts", task_runner=ray_task_runner(), log_prints=True)
def experts(config: ExpertsConfig) -> list[dict[str, Any]]:
    """Train expert sets (one Ray task per expert), publish them, report accuracy and smoothness."""
    store = start(config.store, config.resources)
    validate_data(config.data)  # in the flow process: fails fast, before any Ray worker starts
    dataset = materialize_dataset.submit(config.data, store).result()
    pending = []
    with heavy(config.resources, "experts"):
        for cfg in config.experts:
            runs = [train_one_expert.submit(dataset, cfg, i, store) for i in range(cfg.num_experts)]
            pending.append((cfg, runs))
    sets = [publish_experts.submit(dataset, cfg, store, [r.result() for r in runs]).result() for cfg, runs in pending]
    rows = report_experts.submit(sets, f"experts-{config.data.name}").result()
    print({cfg.recipe: ref.uri for (cfg, _), ref in zip(pending, sets)})
    return rows


def main() -> None:
    _, params = flow_params("experts", doc=__doc__)
    experts(build_config(ExpertsConfig, params))


if __name__ == "__main__":
    main()

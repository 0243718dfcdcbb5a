"""Flows `prune` and `prune-eval`: DP4TL source pruning for transfer learning, and its evidence.

`prune` (selection only): source and target datasets -> surrogate trained on the full source (or
your weights) -> one selection per (method, seed): per-class votes and ranks (selection Parquet)
and the kept source samples per pruning ratio -> a table of the top and bottom source classes.

`prune-eval` (selection + pretrain + transfer): the same, then for every (method, ratio, seed)
the pruned source is materialized, a fresh network pretrains on it for a fixed epoch budget and
transfers to the target by linear probe and full fine-tune (one Ray task each), next to
full-source pretraining and no pretraining -> accuracy table and a plot of target accuracy vs
pruning ratio per method.

Run it:
    prefect deployment run 'prune-eval/cpu' --watch     # Tiny-ImageNet-200 (32 px) -> CIFAR-10
    python -m flows.prune --preset tiny                 # selection only, in-process
    python -m flows.prune --flow prune-eval --preset tiny
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.data import DataConfig, DataError
from distill.transfer import TransferConfig
from dp4tl.methods import SelectionConfig, check_ratio, get_method
from dp4tl.surrogate import SurrogateConfig
from flows.presets import build_config, flow_params, start
from tasks.artifacts import ArtifactRef
from tasks.datasets import materialize_dataset, validate_data
from tasks.prune import materialize_pruned, report_selection, select, surrogate
from tasks.runtime import Resources, heavy, ray_task_runner
from tasks.transfer import FULL, SCRATCH, pretrain_transfer, report_transfer


class PruneConfig(BaseModel):
    """Parameters of the `prune` flow (a validated form in the Prefect UI)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: DataConfig = Field(description="The many-class source dataset to prune (e.g. Tiny-ImageNet-200).")
    target: DataConfig = Field(description="The downstream task; its train split drives the selection.")
    surrogate: SurrogateConfig = Field(default_factory=SurrogateConfig, description="Surrogate net and recipe.")
    surrogate_weights: str | None = Field(
        None,
        description="Your surrogate weights (safetensors from dp4tl.surrogate.save_surrogate) instead of "
        "training one; the head must have one output per source class.",
    )
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Methods, ratios and seeds.")
    top_classes: int = Field(10, ge=1, description="Top and bottom source classes shown per method.")
    resources: Resources = Field(default_factory=Resources, description="Ray resources per heavy task.")
    store: str | None = Field(None, description="Artifact store URI; default $DISTILLERY_STORE or ./artifacts.")

    @field_validator("surrogate_weights")
    @classmethod
    def _weights_exist(cls, v: str | None) -> str | None:
        # Checked with the form, not when the surrogate stage finally opens the file.
        if v is not None and "://" not in v and not os.path.isfile(os.path.expanduser(v)):
            raise ValueError(
                f"surrogate_weights {v!r}: no such file (give a safetensors file written by "
                "dp4tl.surrogate.save_surrogate, or leave it empty to train a surrogate)"
            )
        return v

    @model_validator(mode="after")
    def _ratios_fit_the_classes(self) -> PruneConfig:
        # With an explicit class list the count is known now; otherwise the data check at flow start has it.
        if self.source.classes is not None:
            for ratio in self.selection.ratios:
                check_ratio(ratio, len(self.source.classes))
        return self

    @model_validator(mode="after")
    def _sizes_fit(self) -> PruneConfig:
        s, t = self.source.image_size, self.target.image_size
        if s is not None and t is not None and s != t and not self.selection.resize_target:
            raise ValueError(
                f"source images are {s} px but target images {t} px, and selection.resize_target is false; "
                "set both image_size to one value or allow resizing"
            )
        return self


class PruneEvalConfig(PruneConfig):
    """Parameters of the `prune-eval` flow: `prune`'s, plus how each pruned source is pretrained and judged."""

    transfer: TransferConfig = Field(
        default_factory=TransferConfig,
        description="Net, pretraining (the same epoch budget for every arm), linear probe and fine-tune "
        "(distill.transfer).",
    )
    full_source: bool = Field(True, description="Also pretrain on the whole source (the arm to match).")
    no_pretraining: bool = Field(True, description="Also transfer from a randomly initialized net (the floor).")


def _check_against_data(config: PruneConfig) -> None:
    """Refuse, before any training, settings the data cannot satisfy (from labels only)."""
    source = validate_data(config.source)
    target = validate_data(config.target)
    present = [n for n in source[config.source.train_split] if n > 0]
    if sum(target[config.target.train_split]) == 0:
        raise DataError(f"the target's {config.target.train_split!r} split selects no images ({config.target.source})")
    for ratio in config.selection.ratios:
        check_ratio(ratio, len(present))
    k = config.selection.k_clusters or len(present)
    if "fm_kmeans" in config.selection.methods and k > sum(present):
        raise ValueError(f"k_clusters={k} is larger than the {sum(present)} source samples; lower it")


def _datasets(config: PruneConfig, store: str) -> tuple[ArtifactRef, ArtifactRef]:
    _check_against_data(config)  # in the flow process: fails fast, before any Ray worker starts
    source_f = materialize_dataset.submit(config.source, store)
    target_f = materialize_dataset.submit(config.target, store)
    return source_f.result(), target_f.result()


def _submit_selections(config: PruneConfig, source: ArtifactRef, target: ArtifactRef, store: str) -> dict:
    """The surrogate (waited for), then one selection task per (method, seed), cheapest first: those that
    read only the target (label mapping, random) before those that embed the whole source (feature
    mapping, K-means), so a caller consuming them in order starts work while the slow ones run."""
    with heavy(config.resources, "surrogate"):
        sur = surrogate.submit(source, config.surrogate, store, config.surrogate_weights).result()
    order = sorted(config.selection.methods, key=lambda m: get_method(m).needs_source_images)
    with heavy(config.resources, "selection"):
        return {
            (m, s): select.submit(source, target, sur, m, s, config.selection, store)
            for m in order
            for s in config.selection.seeds
        }


def _report_selections(config: PruneConfig, selections: dict[tuple[str, int], ArtifactRef]) -> None:
    name = f"prune-{config.source.name}-to-{config.target.name}"
    # in the order the user listed the methods (they were run cheapest first)
    ordered = [selections[(m, s)] for m in config.selection.methods for s in config.selection.seeds]
    report_selection(ordered, name, config.top_classes)


@flow(name="prune", task_runner=ray_task_runner(), log_prints=True)
def prune(config: PruneConfig) -> dict[str, Any]:
    """Select the source classes (or samples) each method keeps, per ratio and seed; no pretraining."""
    store = start(config.store, config.resources)
    source, target = _datasets(config, store)
    selections = {k: f.result() for k, f in _submit_selections(config, source, target, store).items()}
    _report_selections(config, selections)
    out = {f"{m}/seed{s}": selections[(m, s)].uri for m in config.selection.methods for s in config.selection.seeds}
    print(json.dumps(out, indent=1))
    return {"source_uri": source.uri, "target_uri": target.uri, "selections": out}


@flow(name="prune-eval", task_runner=ray_task_runner(), log_prints=True)
def prune_eval(config: PruneEvalConfig) -> dict[str, Any]:
    """Selection, then pretrain on every pruned source and transfer to the target; accuracy table and plot."""
    store = start(config.store, config.resources)
    source, target = _datasets(config, store)
    sel = config.selection
    # The comparison arms (the whole source, no pretraining at all) need no selection: submitted
    # first, they train on the CPUs the surrogate leaves idle.
    arms = [(source, FULL)] * config.full_source + [(None, SCRATCH)] * config.no_pretraining
    with heavy(config.resources, "transfer"):
        runs = [
            pretrain_transfer.submit(arm, target, config.transfer, s, store, method, 0.0)
            for s in sel.seeds
            for arm, method in arms
        ]
    selections = {}
    # Each selection's arms are submitted as soon as it is ready (cheap selections come first), so
    # label mapping's pretraining runs while K-means clusters the source.
    for (m, s), future in _submit_selections(config, source, target, store).items():
        selections[(m, s)] = future.result()
        for r in sel.ratios:
            # cheap (row copies, no decoding), so in the flow process: no Ray round trip per view
            pruned = materialize_pruned(source, selections[(m, s)], r, store)
            with heavy(config.resources, "transfer"):
                runs.append(pretrain_transfer.submit(pruned, target, config.transfer, s, store, m, r))
    _report_selections(config, selections)
    rows = [r.result() for r in runs]
    table = report_transfer(rows, f"prune-eval-{config.source.name}-to-{config.target.name}", store)
    print(json.dumps({"summary": table.summary, "metrics": table.ref.uri}, indent=1))
    return {
        "summary": table.summary,
        "metrics_uri": table.ref.uri,
        "rows": rows,
        "selections": {f"{m}/seed{s}": ref.uri for (m, s), ref in selections.items()},
    }


FLOWS = {"prune": (prune, PruneConfig), "prune-eval": (prune_eval, PruneEvalConfig)}


def main() -> None:
    args, params = flow_params(
        "prune",
        doc=__doc__,
        extra=lambda parser: parser.add_argument(
            "--flow", choices=sorted(FLOWS), default="prune", help="prune (selection only) or prune-eval"
        ),
    )
    fn, cfg = FLOWS[args.flow]
    fn(build_config(cfg, params))


if __name__ == "__main__":
    main()

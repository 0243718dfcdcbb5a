"""The Prefect UI's run form is generated from each flow's parameter JSON schema: every field must
carry a description (the form's help text), and registry-backed names must be enums (drop-downs)
listing exactly the registry's choices, so the form never drifts from the code."""

from __future__ import annotations

import pytest

from distill.augment import AUGMENTS
from distill.krr import METHODS
from distill.nets import NETS
from distill.transfer import TransferConfig
from dp4tl.methods import PRUNE_METHODS
from flows.baseline import BaselineConfig
from flows.distill_krr import DistillKRRConfig
from flows.distill_tm import DistillTMConfig
from flows.experts import ExpertsConfig
from flows.pipeline import PipelineConfig
from flows.prune import PruneConfig, PruneEvalConfig

FLOW_CONFIGS = [
    BaselineConfig,
    ExpertsConfig,
    PruneConfig,
    PruneEvalConfig,
    DistillTMConfig,
    DistillKRRConfig,
    PipelineConfig,
]


def _refs(prop: dict) -> list[str]:
    """Names of the models a property points to: directly, as list items, or inside an anyOf (optional)."""
    options = [prop, *prop.get("anyOf", [])]
    refs = [o.get("$ref") or (o.get("items") or {}).get("$ref") for o in options]
    return [r.split("/")[-1] for r in refs if r]


def _fields(schema: dict):
    """(model title, field name, property) for every field of the schema and of every model it reaches."""
    defs = schema.get("$defs", {})
    todo, seen = [schema], set()
    while todo:
        model = todo.pop()
        for name, prop in model.get("properties", {}).items():
            yield model.get("title"), name, prop
            for ref in _refs(prop):
                if ref not in seen:
                    seen.add(ref)
                    todo.append(defs[ref])


def _prop(schema: dict, model: str, field: str) -> dict:
    found = [p for title, name, p in _fields(schema) if title == model and name == field]
    assert found, f"{model}.{field} is not in the schema"
    return found[0]


@pytest.mark.parametrize("config", FLOW_CONFIGS, ids=lambda c: c.__name__)
def test_every_field_of_every_flow_parameter_has_a_description(config):
    schema = config.model_json_schema()
    fields = list(_fields(schema))
    assert len(fields) > 10  # the walk reached the nested configs
    missing = sorted({f"{model}.{name}" for model, name, prop in fields if not prop.get("description", "").strip()})
    assert not missing, f"fields without a description in {config.__name__}: {', '.join(missing)}"


def test_registry_backed_names_are_drop_downs_of_the_registry():
    pipeline = PipelineConfig.model_json_schema()
    assert _prop(pipeline, "EvalConfig", "net")["enum"] == NETS.choices()
    assert _prop(pipeline, "TransferConfig", "net")["enum"] == NETS.choices()
    assert _prop(pipeline, "TrainConfig", "augment")["enum"] == AUGMENTS.choices()
    assert _prop(pipeline, "PruneStage", "method")["enum"] == PRUNE_METHODS.choices()
    assert _prop(pipeline, "KRRStage", "methods")["items"]["enum"] == METHODS.choices()
    assert "dsa" in AUGMENTS.choices() and "resnet18" in NETS.choices()  # the enums are not trivially short


def test_prefect_s_parameter_schema_carries_the_drop_downs_and_descriptions():
    # what the UI's run form is built from: Prefect's schema of the flow's signature
    from prefect.utilities.callables import parameter_schema

    from distill.matching import INITS, MEMORY_MODES
    from flows.distill_tm import distill_tm_flow

    defs = parameter_schema(distill_tm_flow).model_dump()["definitions"]
    match = defs["MatchConfig"]["properties"]
    assert match["memory"]["enum"] == MEMORY_MODES.choices() and "unrolled" in match["memory"]["description"]
    assert match["init"]["enum"] == INITS.choices()
    assert defs["EvalConfig"]["properties"]["net"]["enum"] == NETS.choices()
    assert "DSA" in defs["ExpertConfig"]["properties"]["augment"]["description"]


def test_a_name_outside_the_drop_down_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown net 'vgg'; valid: convnet"):
        TransferConfig(net="vgg")

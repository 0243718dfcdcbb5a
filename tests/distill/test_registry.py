"""Tests for distill.registry and for every registry of the core answering the same way."""

import pytest
from pydantic import BaseModel, ValidationError

from distill.augment import AUGMENTS
from distill.data import SOURCE_FORMATS
from distill.experts import RECIPES
from distill.krr import METHODS, POOL_MODES
from distill.matching import INITS, MEMORY_MODES
from distill.nets import ACTS, NETS, NORMS, POOLS
from distill.registry import Registry, UnknownNameError
from distill.train import LOSSES, OPTIMIZERS, SCHEDULES
from dp4tl.methods import PRUNE_METHODS
from dp4tl.selection import SELECTORS

ALL = {
    "net": NETS,
    "norm": NORMS,
    "act": ACTS,
    "pooling": POOLS,
    "augment": AUGMENTS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "loss": LOSSES,
    "expert recipe": RECIPES,
    "init": INITS,
    "memory mode": MEMORY_MODES,
    "pool_mode": POOL_MODES,
    "method": METHODS,
    "selector": SELECTORS,
    "pruning method": PRUNE_METHODS,
    "dataset format": SOURCE_FORMATS,
}


def test_unknown_names_list_the_choices_in_registration_order():
    colours = Registry("colour", {"red": 1})
    colours.register("blue")(2)
    assert colours.choices() == ["red", "blue"] and colours["blue"] == 2
    with pytest.raises(UnknownNameError, match=r"^unknown colour 'green'; valid: red, blue$"):
        colours["green"]
    with pytest.raises(ValueError, match="unknown colour 'green'"):
        colours.check("green")
    assert colours.check("red") == "red" and colours.get("green") is None and "green" not in colours
    with pytest.raises(ValueError, match=r"unknown colour\(s\) 'green', 'pink'; valid: red, blue"):
        colours.check_all(["red", "green", "pink"])
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        colours.register("red")(3)


def test_name_type_validates_configs_and_offers_the_choices_as_an_enum():
    shapes = Registry("shape", {"circle": 0, "square": 4})

    class Drawing(BaseModel):
        shape: shapes.name_type() = "circle"
        more: list[shapes.name_type()] = []

    assert Drawing(shape="square", more=["circle"]).shape == "square"
    with pytest.raises(ValidationError, match="unknown shape 'cube'; valid: circle, square"):
        Drawing(shape="cube")
    with pytest.raises(ValidationError, match="unknown shape 'cone'"):
        Drawing(more=["cone"])
    shapes.register("triangle")(3)  # the schema is read when generated, so later registrations show
    schema = Drawing.model_json_schema()["properties"]
    assert schema["shape"]["enum"] == ["circle", "square", "triangle"]
    assert schema["more"]["items"]["enum"] == ["circle", "square", "triangle"]


@pytest.mark.parametrize("kind", sorted(ALL))
def test_every_core_registry_answers_the_same_way(kind):
    registry = ALL[kind]
    assert isinstance(registry, Registry) and registry.kind == kind and registry.choices()
    with pytest.raises(UnknownNameError, match=rf"^unknown {kind} 'nope'; valid: {', '.join(registry.choices())}$"):
        registry["nope"]

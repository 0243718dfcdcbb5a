"""Named registries (name -> implementation) with one error message and one list of choices.

Every registry of the core (nets, norms, augmentations, optimizers, losses, expert recipes,
KRR-ST pools and methods, DP4TL selectors and pruning methods, ...) is a `Registry`: a dict
that fills itself through `@REG.register(name)`, refuses a second registration of a name,
and answers an unknown name with the same sentence everywhere:

    unknown net 'vgg'; valid: convnet, convnet_d4, convnet_d5, convnet_bn, resnet18

Choices are listed in registration order (the order the module chose, defaults first).
`REG.name_type()` is a config field type: a str validated against the registry when the
config is built, whose JSON schema lists the choices as an enum, so the Prefect UI shows a
drop-down.

    from distill.registry import Registry
    COLOURS = Registry("colour", {"red": 1})
    COLOURS.register("blue")(2)
    COLOURS["green"]   # ValueError: unknown colour 'green'; valid: red, blue
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Generic, Iterable, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists the valid ones."""


class Registry(dict[str, T], Generic[T]):
    """A dict of named implementations with a uniform unknown-name error and `choices()`."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None):
        super().__init__(entries or {})
        self.kind = kind  # what one entry is, for messages: "net", "augment", "pruning method"

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding `value` under `name`; a name is registered once."""

        def add(value: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = value
            return value

        return add

    def choices(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self)

    def unknown(self, name: Any) -> str:
        return f"unknown {self.kind} {name!r}; valid: {', '.join(self.choices())}"

    def __missing__(self, name: str) -> T:
        raise UnknownNameError(self.unknown(name))

    def check(self, name: str) -> str:
        """`name` if registered, else UnknownNameError listing the valid names."""
        if name not in self:
            raise UnknownNameError(self.unknown(name))
        return name

    def check_all(self, names: Iterable[str]) -> list[str]:
        """`names` as a list if all are registered, else one error naming every unknown one."""
        names = list(names)
        unknown = [n for n in names if n not in self]
        if unknown:
            raise UnknownNameError(
                f"unknown {self.kind}(s) {', '.join(map(repr, unknown))}; valid: {', '.join(self.choices())}"
            )
        return names

    def name_type(self) -> Any:
        """A config field type: a str validated against this registry, an enum of its choices in JSON schema."""
        return Annotated[str, AfterValidator(self.check), _Choices(self)]


@dataclass(frozen=True, eq=False)
class _Choices:
    """JSON schema hook: the registry's names as the field's enum, read when the schema is generated."""

    registry: Registry

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict:
        schema = handler(core_schema)
        schema["enum"] = self.registry.choices()
        return schema

"""Typed registries: one mechanism for every kind of component.

Every registered component class declares a pydantic config class (`config_class`); the YAML section for
the component is validated against it. Names map to classes, never to import paths from a config. Two
registries hold classes that take no config section of their own (`needs_config=False`): the record
formats and the data-source kinds that a data config's `sources` name.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from arctic_vl.errors import ConfigError


class ComponentConfig(BaseModel):
    """Base of every component's config: a `type` that names the registered class, no unknown keys.

    Every float is finite unless its field says otherwise (`Field(allow_inf_nan=True)`): an `lr` of `.inf`
    validates in plain pydantic and turns the run into NaNs. Nested models (parameter groups, LoRA, a
    plugin's own sub-configs) follow the same rule: `non_finite_values` finds them, and config validation
    reports each with its file and line.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), arbitrary_types_allowed=False,
                              allow_inf_nan=False)

    type: str


def non_finite_values(model: BaseModel, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], float]]:
    """(key path, value) of every inf/nan float in `model`, nested models, lists and dicts included, except in
    fields declared with `allow_inf_nan=True`."""
    found: list[tuple[tuple[Any, ...], float]] = []
    for name, info in type(model).model_fields.items():
        allowed = any(getattr(m, "allow_inf_nan", False) is True for m in info.metadata)
        _collect_non_finite(getattr(model, name, None), (*path, info.alias or name), allowed, found)
    return found


def _collect_non_finite(value: Any, path: tuple[Any, ...], allowed: bool, found: list[Any]) -> None:
    if isinstance(value, float):
        if not allowed and not math.isfinite(value):
            found.append((path, value))
    elif isinstance(value, BaseModel):
        found.extend(non_finite_values(value, path))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _collect_non_finite(item, (*path, i), allowed, found)
    elif isinstance(value, dict):
        for key, item in value.items():
            _collect_non_finite(item, (*path, key), allowed, found)


T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class for one kind of component (models, data, trainers, ...).

    `register` is a class decorator. Registering the same class twice is harmless (plugins may be
    imported more than once); a different class under a taken name is an error naming both.
    `needs_config=False`: the registered classes are chosen by name inside another section (no `config_class`).
    """

    def __init__(self, kind: str, section: str, base: type | None = None, *, needs_config: bool = True):
        self.kind = kind
        self.section = section
        #: whether a registered class must declare `config_class` (a ComponentConfig subclass)
        self.needs_config = needs_config
        #: the class every registered class must subclass; bound by the module that defines it (`bind_base`)
        self.base: type | None = base
        self._classes: dict[str, type[T]] = {}
        self._origin: dict[str, str] = {}
        #: set by the plugin loader while a plugin module imports, so `arctic_vl plugins` can say who registered what
        self.current_origin: str = "arctic_vl"

    def bind_base(self, base: type) -> type:
        """Declare the base class of this registry (called where the base class is defined); returns it."""
        self.base = base
        return base

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register the class as `name` (it must subclass `base` and, unless the registry was
        made with `needs_config=False`, set `config_class`)."""

        def decorator(cls: type[T]) -> type[T]:
            config_class = getattr(cls, "config_class", None)
            if self.needs_config and not (isinstance(config_class, type) and issubclass(config_class, ComponentConfig)):
                raise TypeError(
                    f"{self.kind} '{name}' ({_qualname(cls)}) must set config_class to a ComponentConfig subclass"
                )
            if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.kind} '{name}': {_qualname(cls)} is not a subclass of {_qualname(self.base)}; "
                                f"every {self.kind} registered in {self.section!r} must derive from it")
            existing = self._classes.get(name)
            if existing is not None and not _same_class(existing, cls):
                raise ValueError(
                    f"{self.kind} name '{name}' is taken by {_qualname(existing)}; "
                    f"cannot register {_qualname(cls)} under it"
                )
            self._classes[name] = cls
            self._origin.setdefault(name, self.current_origin)
            cls.registered_name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        """The class registered as `name`; a ConfigError listing the registered names otherwise.

        Lookups never discover plugins: the entry points (Engine, the CLI, the schema) call
        `arctic_vl.load_plugins()` once, before any lookup.
        """
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """The error text for an unregistered type name: the registered names and the closest match."""
        names = sorted(self._classes)
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        loaded = "" if names else " (no components: call arctic_vl.load_plugins() first)"
        return f"unknown {self.kind} type '{name}'. Registered: {', '.join(names) or '(none)'}.{hint}{loaded}"

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def origin(self, name: str) -> str:
        """Who registered `name`: `arctic_vl` for the core, else the plugin's entry-point name."""
        return self._origin.get(name, "?")

    def items(self) -> Iterator[tuple[str, type[T]]]:
        """(name, class) pairs, sorted by name."""
        yield from sorted(self._classes.items())

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {sorted(self._classes)})"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(a: type, b: type) -> bool:
    # A module re-imported under the same name (e.g. importlib.reload) makes a new class object
    # with the same qualified name: treat as the same registration.
    return a is b or _qualname(a) == _qualname(b)


# One registry per config section. The order is the order of sections in a config file.
MODELS: Registry[Any] = Registry("model factory", "model")
DATA: Registry[Any] = Registry("data factory", "data")
TRAINERS: Registry[Any] = Registry("trainer", "trainer")
OPTIMIZERS: Registry[Any] = Registry("optimizer", "optimizer")
SCHEDULERS: Registry[Any] = Registry("scheduler", "scheduler")
CHECKPOINTERS: Registry[Any] = Registry("checkpointer", "checkpoint")
CALLBACKS: Registry[Any] = Registry("callback", "callbacks")
DISTRIBUTED: Registry[Any] = Registry("distributed backend", "distributed")

REGISTRIES: dict[str, Registry[Any]] = {
    r.section: r for r in (MODELS, DATA, TRAINERS, OPTIMIZERS, SCHEDULERS, CHECKPOINTERS, CALLBACKS, DISTRIBUTED)
}

# Registries of the data path, chosen by name inside `data.sources` (`format:`, the path's kind): no section.
RECORD_FORMATS: Registry[Any] = Registry("record format", "record_formats", needs_config=False)
DATA_SOURCES: Registry[Any] = Registry("data source kind", "data_sources", needs_config=False)

#: every registry, for plugin bookkeeping (`arctic_vl plugins` lists what each plugin registered in each)
ALL_REGISTRIES: dict[str, Registry[Any]] = {**REGISTRIES, **{r.section: r for r in (RECORD_FORMATS, DATA_SOURCES)}}


class Component:
    """Mixin for registered classes: `config_class` declares the pydantic config of the YAML section."""

    config_class: ClassVar[type[ComponentConfig]] = ComponentConfig
    registered_name: ClassVar[str] = ""

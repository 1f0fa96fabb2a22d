"""Typed training events. Callbacks observe; they never change the math of a step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arctic_vl.registry import Component, ComponentConfig


@dataclass
class StepInfo:
    """What one optimizer step did (the same numbers as a metrics.jsonl line)."""

    step: int
    total_steps: int
    epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Callback(Component):
    """Override any of the `on_*` events. `trainer` is the running Trainer (read-only by convention)."""

    config_class = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    def on_train_start(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, info: StepInfo) -> None: ...

    def on_log(self, trainer: Any, metrics: dict[str, Any]) -> None: ...

    def on_evaluate(self, trainer: Any, results: dict[str, Any]) -> None: ...

    def on_save(self, trainer: Any, path: str) -> None: ...

    def on_train_end(self, trainer: Any, summary: dict[str, Any]) -> None: ...


class CallbackList:
    """Dispatches events to every callback, in config order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def __getattr__(self, event: str):
        if not event.startswith("on_"):
            raise AttributeError(event)

        def fire(*args: Any, **kwargs: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, event)(*args, **kwargs)

        return fire

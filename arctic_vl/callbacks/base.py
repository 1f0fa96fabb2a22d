"""Typed training events. Callbacks observe; they never change the math of a step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arctic_vl.registry import CALLBACKS, Component, ComponentConfig


@dataclass
class StepInfo:
    """What one optimizer step did (the same numbers as a metrics.jsonl line)."""

    step: int
    total_steps: int
    epoch: int
    metrics: dict[str, Any] = field(default_factory=dict)


class Callback(Component):
    """Observes a run; registered in `CALLBACKS`, listed in the config's `callbacks:`.

    Override any of the `on_*` events; each is called on every rank (check `trainer.is_main` to write once).
    `trainer` is the running Trainer: read it (`state`, `config`, `output_dir`, `total_steps`), never change
    the math of a step. `on_step_end` gets a StepInfo whose `metrics` are the metrics.jsonl line of the step;
    `on_evaluate` the evaluation results; `on_save` the checkpoint path; `on_train_end` the run's summary.
    """

    config_class = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    def on_train_start(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, info: StepInfo) -> None: ...

    def on_log(self, trainer: Any, metrics: dict[str, Any]) -> None: ...

    def on_evaluate(self, trainer: Any, results: dict[str, Any]) -> None: ...

    def on_save(self, trainer: Any, path: str) -> None: ...

    def on_train_end(self, trainer: Any, summary: dict[str, Any]) -> None: ...


CALLBACKS.bind_base(Callback)


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

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
    `trainer` is the running Trainer: read it (`state`, `config`, `output_dir`, `run_config`, `total_steps`),
    never change the math of a step.

    Two kinds of run fire events: training (`arctic_vl train`, `Engine.train`) and a standalone evaluation
    (`arctic_vl evaluate`, `Engine.evaluate`). Both open with `on_run_start` and close with `on_run_end`
    (also when the run fails): open and close writers, tracker runs and connections there, so a callback
    works in either. Training adds `on_train_start` (the run's length and resumed step are known),
    `on_step_end` (a StepInfo whose `metrics` are the metrics.jsonl line of the step), `on_log`, `on_save`
    (the checkpoint path) and `on_train_end` (the run's summary); both call `on_evaluate` with the results
    (`trainer.standalone_evaluation` tells them apart; `trainer.state.step` is the step of the weights
    evaluated). `validate`, `export`, `inspect-data` and `plugins` run no model and fire no events: callbacks
    are built only for the two kinds of run.
    """

    config_class = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    def on_run_start(self, trainer: Any) -> None:
        """Before training or a standalone evaluation starts, on every rank: open writers and connections here."""

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        """After the run, also when it failed (`failed` is then True): close what `on_run_start` opened."""

    def on_train_start(self, trainer: Any) -> None:
        """Training only: the run's length (`trainer.total_steps`) and resumed step (`trainer.state.step`) are known."""

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        """After each optimizer step; `info.metrics` is the step's metrics.jsonl line."""

    def on_log(self, trainer: Any, metrics: dict[str, Any]) -> None:
        """Training only: right after `on_step_end`, with the same metrics line."""

    def on_evaluate(self, trainer: Any, results: dict[str, Any]) -> None:
        """After an evaluation, in training or standalone (`trainer.standalone_evaluation`), with its results."""

    def on_save(self, trainer: Any, path: str) -> None:
        """After a checkpoint is written, with its path."""

    def on_train_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        """Training only: the run finished or was stopped by a signal; `summary` is what `Trainer.train` returns."""


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

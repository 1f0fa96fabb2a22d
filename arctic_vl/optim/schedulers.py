"""Learning-rate schedules: linear warmup, then cosine / linear decay to `min_lr_ratio`, or constant; plus
per-part LR phases.

A phase multiplies the scheduled LR of some parameter groups by `lr_factor` over a span of the run::

    scheduler:
      phases:
        - {parts: [vision], until_epoch: 1, lr_factor: 0}   # the vision tower frozen during epoch 0
        - {parts: [llm], from: 0.75, lr_factor: 0.1}        # the LLM's LR / 10 for the last 25% of steps

`parts` names model parts (`vision`, `aligner`, `llm`, a model factory's own) or `optimizer.param_groups`
names. A span starts at `from` (a fraction of the run's optimizer steps: step int(from x total)), `from_epoch`
or `from_step` (0-based optimizer steps) and ends before `until` / `until_epoch` / `until_step`; an open end
runs to the end of the run. Factors of overlapping phases multiply. Factor 0 freezes: AdamW with LR 0 changes
no weight (its decoupled weight decay is LR x decay too), though the frozen part's gradients still count in
the gradient norm (clipping) and its Adam moments keep averaging them, alike under every backend. The factor
is a pure function of the step, so resume repeats the schedule exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from arctic_vl.constants import PARTS
from arctic_vl.errors import ConfigError
from arctic_vl.plugins import register_config_check
from arctic_vl.registry import MODELS, SCHEDULERS, Component, ComponentConfig

_STARTS = ("from", "from_epoch", "from_step")
_ENDS = ("until", "until_epoch", "until_step")


class LRPhase(BaseModel):
    """One `scheduler.phases` entry: `parts` (part or param-group names) get `lr_factor` x their scheduled LR from
    one of `from` / `from_epoch` / `from_step` until one of `until` / `until_epoch` / `until_step`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)  # `from` in YAML

    parts: list[str] = Field(..., min_length=1, description="parts (vision, aligner, llm, the model factory's own) "
                             "or optimizer.param_groups names")
    from_: float | None = Field(None, alias="from", ge=0, le=1, description="start, a fraction of the run's steps")
    until: float | None = Field(None, ge=0, le=1, description="end (exclusive), a fraction of the run's steps")
    from_epoch: int | None = Field(None, ge=0, description="start: the first step of this epoch")
    until_epoch: int | None = Field(None, ge=0, description="end (exclusive): the first step of this epoch")
    from_step: int | None = Field(None, ge=0, description="start: this 0-based optimizer step")
    until_step: int | None = Field(None, ge=0, description="end (exclusive): this 0-based optimizer step")
    lr_factor: float = Field(..., ge=0, description="multiplies the scheduled LR; 0 freezes")

    @model_validator(mode="after")
    def _one_start_one_end(self) -> LRPhase:
        values = {"from": self.from_, "until": self.until, "from_epoch": self.from_epoch,
                  "until_epoch": self.until_epoch, "from_step": self.from_step, "until_step": self.until_step}
        starts = [k for k in _STARTS if values[k] is not None]
        ends = [k for k in _ENDS if values[k] is not None]
        if len(starts) > 1:
            raise ValueError(f"give one start, not {' and '.join(starts)}")
        if len(ends) > 1:
            raise ValueError(f"give one end, not {' and '.join(ends)}")
        if not starts and not ends:
            raise ValueError(f"give a start ({', '.join(_STARTS)}) and/or an end ({', '.join(_ENDS)})")
        for a_key, b_key in zip(_STARTS, _ENDS):  # the same kind of bound: their order is known now
            a, b = values[a_key], values[b_key]
            if a is not None and b is not None and a >= b:
                raise ValueError(f"{a_key} ({a}) must be before {b_key} ({b})")
        return self

    def span(self, total: int, epoch_start: Callable[[int], int] | None, where: str) -> tuple[int, int]:
        """[start, end) in 0-based optimizer steps of a run of `total` steps; `epoch_start(k)`: epoch k's first step."""
        def at(frac: float | None, epoch: int | None, step: int | None, default: int, name: str) -> int:
            if frac is not None:
                return int(frac * total)
            if epoch is not None:
                if epoch_start is None:
                    raise ConfigError(f"{where}.{name}_epoch: this trainer cannot map epochs to steps; give "
                                      f"{name} (a fraction of the run) or {name}_step")
                return epoch_start(epoch)
            return step if step is not None else default

        start = at(self.from_, self.from_epoch, self.from_step, 0, "from")
        end = at(self.until, self.until_epoch, self.until_step, total, "until")
        return start, end


class SchedulerConfig(ComponentConfig):
    """The `scheduler:` section: warmup (steps or a ratio of the run), the final LR as a ratio of each group's, and
    per-part LR `phases`."""

    type: str = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of the run (if warmup_steps unset)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final LR as a fraction of each group's LR")
    phases: list[LRPhase] = Field(default_factory=list, description="per-part LR factors over spans of the run "
                                  "(e.g. {parts: [llm], from: 0.75, lr_factor: 0.1})")

    @model_validator(mode="after")
    def _one_warmup(self) -> SchedulerConfig:
        if self.warmup_steps is not None and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        return self


class Scheduler(Component):
    """A LambdaLR over the run's total optimizer steps; its state is just the step count."""

    config_class = SchedulerConfig

    def __init__(self, config: SchedulerConfig):
        self.config = config

    def with_phases(self, phases: list[LRPhase]) -> Scheduler:
        """A copy of this scheduler with `phases` after the configured ones (a trainer's shorthand, e.g. bbu's
        `detection_freeze_epochs`)."""
        return type(self)(self.config.model_copy(update={"phases": [*self.config.phases, *phases]}))

    def factor(self, step: int, total: int) -> float:
        """LR multiplier at `step` of `total`: linear warmup to 1, then `min_lr_ratio` + the rest times `decay`."""
        c = self.config
        warmup = c.warmup_steps if c.warmup_steps is not None else int(c.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * self.decay(progress)

    def decay(self, progress: float) -> float:
        """The decay shape after warmup at `progress` in [0, 1], 1 at the start; subclasses implement it."""
        raise NotImplementedError

    def phase_spans(self, optimizer: torch.optim.Optimizer, total_steps: int,
                    epoch_start: Callable[[int], int] | None = None) -> list[list[tuple[int, int, float]]]:
        """For each optimizer param group, its phases as (start, end, factor) in 0-based optimizer steps."""
        spans: list[list[tuple[int, int, float]]] = [[] for _ in optimizer.param_groups]
        names = [str(g.get("name", "default")).split("/", 1)[0] for g in optimizer.param_groups]
        for i, phase in enumerate(self.config.phases):
            where = f"scheduler.phases[{i}]"
            wanted = set(phase.parts)
            start, end = phase.span(total_steps, epoch_start, where)
            matched = False
            for j, group in enumerate(optimizer.param_groups):
                parts = set(group.get("parts") or ())
                if names[j] in wanted or (parts and parts <= wanted):
                    spans[j].append((start, end, phase.lr_factor))
                    matched = True
                elif parts & wanted:
                    raise ConfigError(
                        f"{where}.parts: optimizer parameter group {names[j]!r} holds parts "
                        f"{', '.join(sorted(parts))}, only some of them in the phase ({', '.join(phase.parts)}); "
                        f"give {', '.join(sorted(parts & wanted))} its own optimizer.param_groups entry")
            if not matched:
                raise ConfigError(
                    f"{where}.parts: {', '.join(phase.parts)} match no optimizer parameter group with trainable "
                    f"parameters (groups: {', '.join(dict.fromkeys(names))})")
        return spans

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int,
              epoch_start: Callable[[int], int] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR applying `factor` (and each group's phases) to the param groups of `optimizer` over
        `total_steps`; `epoch_start(k)`, the first optimizer step of epoch k, places `*_epoch` phase ends."""
        spans = self.phase_spans(optimizer, total_steps, epoch_start)

        def group_lambda(own: list[tuple[int, int, float]]) -> Callable[[int], float]:
            def lam(s: int) -> float:
                f = self.factor(s, total_steps)
                for start, end, k in own:
                    if start <= s < end:
                        f *= k
                return f
            return lam

        return torch.optim.lr_scheduler.LambdaLR(optimizer, [group_lambda(own) for own in spans])


SCHEDULERS.bind_base(Scheduler)


def check_phase_parts(cfg: Any, located: Any) -> None:
    """Config check: every `scheduler.phases[].parts` entry is a part of the model factory or a param-group name."""
    phases = getattr(cfg.scheduler, "phases", None) or []
    if not phases:
        return
    factory = MODELS.get(cfg.model.type) if cfg.model.type in MODELS else None
    parts = tuple(getattr(factory, "parts", PARTS))
    groups = [g.name for g in (getattr(cfg.optimizer, "param_groups", None) or [])] or ["default"]
    for i, phase in enumerate(phases):
        for j, name in enumerate(phase.parts):
            if name not in parts and name not in groups:
                raise ConfigError(f"invalid config: {located.where(('scheduler', 'phases', i, 'parts', j))}: "
                                  f"scheduler.phases[{i}].parts[{j}]: {name!r} is neither a part of model.type "
                                  f"{cfg.model.type!r} ({', '.join(parts)}) nor an optimizer.param_groups name "
                                  f"({', '.join(groups)})")


register_config_check(check_phase_parts)


@SCHEDULERS.register("cosine")
class Cosine(Scheduler):
    """`cosine`: half a cosine from the peak LR down to `min_lr_ratio` after warmup."""

    def decay(self, progress: float) -> float:
        """0.5 (1 + cos(pi progress))."""
        return 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULERS.register("linear")
class Linear(Scheduler):
    """`linear`: a straight line from the peak LR down to `min_lr_ratio` after warmup."""

    def decay(self, progress: float) -> float:
        """1 - progress."""
        return 1 - progress


@SCHEDULERS.register("constant")
class Constant(Scheduler):
    """`constant`: the peak LR after warmup."""

    def decay(self, progress: float) -> float:
        """1: no decay."""
        return 1.0

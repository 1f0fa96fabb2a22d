"""Learning-rate schedules: linear warmup, then cosine / linear decay to `min_lr_ratio`, or constant."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from arctic_vl.registry import SCHEDULERS, Component, ComponentConfig


class SchedulerConfig(ComponentConfig):
    """The `scheduler:` section: warmup (steps or a ratio of the run) and the final LR as a ratio of each group's."""

    type: str = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of the run (if warmup_steps unset)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final LR as a fraction of each group's LR")

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

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR applying `factor` to every param group of `optimizer` over `total_steps`."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.factor(s, total_steps))


SCHEDULERS.bind_base(Scheduler)


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

"""`dense_caption` trainer: SFT with the core's lean LM loss, dense-caption evaluation and augmentation telemetry.

Telemetry: every optimizer step (`train_step`), the augmentation counts of its micro-batches (`_augmentation`,
summed by the collator) are summed over processes and added to the run's totals, kept in the trainer state (so they are
checkpointed and exact across a resume) and written to summary.json (`augmentation`: samples, per-op
applications, objects dropped by crops or clipped away, a histogram of crop coverages in bins of 0.1).
metrics.jsonl gets per-step rates: `aug_<op>` (share of the step's samples the op was applied to) and
`aug_dropped_objects` (objects dropped per sample).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from arctic_vl import NUM_SAMPLES, TRAINERS, LossOutput, SFTTrainer, StepCounts, TrainerConfig

from .augment import COVERAGE_BINS, Telemetry
from .data import AUGMENTATION_KEY
from .evaluation import dense_evaluate

COUNT_KEYS = ("samples", "bypassed", "objects_in", "objects_out", "dropped_by_crop", "dropped_degenerate",
              "clamped_degenerate", "dropped_by_rounding", "over_max_length")
STATE_KEY = "augmentation"


class DenseEvalConfig(TrainerConfig):
    """Settings of the dense-caption evaluation shared by the project's trainers."""

    line_tolerance: float = Field(0.1, gt=0, description="lines match when their symmetric mean distance is at most "
                                  "half of this x the image diagonal (see metrics.py)")


class DenseTrainerMixin:
    """Dense evaluation (`evaluate` hook) and augmentation telemetry for a Trainer subclass."""

    config: Any
    data: Any
    state: Any
    dist: Any
    #: side metrics of `loss` that evaluation also reports over the eval set (as `eval_<name>`, per its count)
    eval_loss_metrics: tuple[str, ...] = ()

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Eval loss and, with `eval.generate: true`, box_f1_50, json_valid_rate and the other dense metrics."""
        return dense_evaluate(self, model, line_tolerance=self.config.line_tolerance)

    def _telemetry_keys(self) -> list[str]:
        aug = getattr(getattr(self.data.train, "config", None), "augmentation", None)
        ops = sorted({spec.name for spec in aug.ops}) if aug is not None else []
        return [*COUNT_KEYS, *(f"op.{n}" for n in ops), *(f"coverage.{b}" for b in range(COVERAGE_BINS))]

    def train_step(self, micro: list[dict[str, Any]], data_time: float) -> dict[str, Any]:
        """The core's step, after adding its augmentation counts to the run's totals."""
        self.record_augmentation(micro)
        return super().train_step(micro, data_time)  # type: ignore[misc]

    def record_augmentation(self, micro: list[dict[str, Any]]) -> None:
        """Add the step's augmentation counts (all processes) to the run's totals in the trainer state."""
        keys = self._telemetry_keys()
        local = [sum(float((b.get(AUGMENTATION_KEY) or {}).get(k, 0)) for b in micro) for k in keys]
        total = self.dist.all_reduce_sum(local)  # every process calls this at the same point of the step
        saved = self.state.extra.setdefault(STATE_KEY, {})
        for k, v in zip(keys, total):
            if v:
                saved[k] = saved.get(k, 0.0) + v

    def augmentation_metrics(self, batch: dict[str, Any]) -> dict[str, tuple[float, float]]:
        """Per-step rates for metrics.jsonl (name -> (sum, count), summed over micro-batches and processes):
        `aug_<op>` for every configured op and `aug_dropped_objects`, on every line while augmentation is on."""
        if not self.data.train.augmenter.active:
            return {}
        counts = batch.get(AUGMENTATION_KEY) or {}
        n = float(batch.get(NUM_SAMPLES, 0))
        out = {f"aug_{k[3:]}": (float(counts.get(k, 0)), n) for k in self._telemetry_keys() if k.startswith("op.")}
        dropped = sum(counts.get(k, 0) for k in ("dropped_by_crop", "dropped_degenerate", "dropped_by_rounding"))
        out["aug_dropped_objects"] = (float(dropped), n)
        return out

    def augmentation_summary(self) -> dict[str, Any] | None:
        """The run's augmentation totals, readable (None when nothing was augmented)."""
        saved = self.state.extra.get(STATE_KEY)
        return Telemetry.summary(saved) if saved else None


@TRAINERS.register("dense_caption")
class DenseCaptionTrainer(DenseTrainerMixin, SFTTrainer):
    """Next-token cross entropy on the answer tokens; dense-caption metrics at evaluation."""

    config_class = DenseEvalConfig

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], counts: StepCounts) -> LossOutput:
        """The SFT loss unchanged; the metrics add the batch's augmentation counts."""
        out = super().loss(model, batch, counts)
        out.metrics.update(self.augmentation_metrics(batch))
        return out

    def summary(self, checkpoint: Any, **extra: Any) -> dict[str, Any]:
        """The core summary plus the run's augmentation totals (None when nothing was augmented)."""
        out = super().summary(checkpoint, **extra)
        out["augmentation"] = self.augmentation_summary()
        return out

"""Built-in callbacks: progress bar, TensorBoard scalars, throughput/memory logging, save delay."""

from __future__ import annotations

import math
import time
from typing import Any

from loguru import logger
from pydantic import Field, model_validator

from arctic_vl.callbacks.base import Callback, StepInfo
from arctic_vl.callbacks.console import LIVE_BARS, console, format_number
from arctic_vl.config.paths import ConfigPath
from arctic_vl.registry import CALLBACKS, ComponentConfig


class ProgressConfig(ComponentConfig):
    """Options of the `progress` callback: none beyond `type` (`trainer.progress_bar` switches it)."""

    type: str = "progress"


@CALLBACKS.register("progress")
class Progress(Callback):
    """A tqdm bar with loss, LR, tokens/s and ETA (rank 0 only).

    On by default; `trainer.progress_bar: false` hides it.
    """

    config_class = ProgressConfig

    def __init__(self, config: ProgressConfig):
        super().__init__(config)
        self.bar: Any = None

    def on_train_start(self, trainer: Any) -> None:
        """Open the bar at the resumed step on the main process, unless `trainer.progress_bar` is false."""
        from tqdm.auto import tqdm

        self.bar = None
        if trainer.is_main and trainer.config.progress_bar:
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.state.step, desc="train", dynamic_ncols=True)
            LIVE_BARS.append(self.bar)

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        """Advance the bar one step, showing the step's loss, LR and tokens/s."""
        if self.bar is not None:
            m = info.metrics
            self.bar.set_postfix(
                loss=format_number(m.get("loss")), lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}", refresh=False
            )
            self.bar.update(1)

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        """Close the bar."""
        if self.bar is not None:
            if self.bar in LIVE_BARS:
                LIVE_BARS.remove(self.bar)
            self.bar.close()
            self.bar = None


class TensorBoardConfig(ComponentConfig):
    """Options of the `tensorboard` callback: where the event files go."""

    type: str = "tensorboard"
    log_dir: ConfigPath | None = Field(None, description="relative to the config file; default: OUTPUT_DIR/tensorboard")


@CALLBACKS.register("tensorboard")
class TensorBoard(Callback):
    """Scalars of every metrics line and evaluation, when tensorboard is installed (rank 0).

    Training steps go under `train/`, evaluations during training under `eval/`, a standalone
    `arctic_vl evaluate` under `eval_standalone/` (at the step of the weights it evaluated).
    """

    config_class = TensorBoardConfig

    def __init__(self, config: TensorBoardConfig):
        super().__init__(config)
        self.writer: Any = None

    def on_run_start(self, trainer: Any) -> None:
        """Open the SummaryWriter on the main process; without tensorboard installed, log that and write nothing."""
        if not trainer.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; skipping TensorBoard scalars")
            return
        self.writer = SummaryWriter(self.config.log_dir or str(trainer.output_dir / "tensorboard"))

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        """Write the step's numeric metrics (not step and epoch) under `train/`."""
        if self.writer is not None:
            for k, v in info.metrics.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{k}", v, info.step)

    def on_evaluate(self, trainer: Any, results: dict[str, Any]) -> None:
        """Write the results' numbers under `eval/` (`eval_standalone/` standalone) at the weights' step."""
        if self.writer is not None:
            prefix = "eval_standalone" if trainer.standalone_evaluation else "eval"
            for k, v in flat_scalars(results).items():
                self.writer.add_scalar(f"{prefix}/{k}", v, trainer.state.step)

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        """Close the writer (flushes the event file)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def flat_scalars(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of an evaluation result, nested dicts flattened with `/` (exact_match_by_type/colour)."""
    out: dict[str, float] = {}
    for k, v in results.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class ThroughputConfig(ComponentConfig):
    """Options of the `throughput` callback: how often it logs."""

    type: str = "throughput"
    every_n_steps: int = Field(10, ge=1)


@CALLBACKS.register("throughput")
class Throughput(Callback):
    """Logs samples/s, tokens/s and peak memory every N steps (the origin's `--throughput_log_steps`)."""

    config_class = ThroughputConfig

    def on_train_start(self, trainer: Any) -> None:
        """Start the clock and the sample and token counts."""
        self.t0, self.samples, self.tokens = time.perf_counter(), 0, 0

    def on_step_end(self, trainer: Any, info: StepInfo) -> None:
        """Count the step's samples and tokens; every `every_n_steps` steps log the rates since the last log."""
        self.samples += info.metrics["samples"]
        self.tokens += info.metrics["tokens"]
        if info.step % self.config.every_n_steps == 0 and trainer.is_main:
            dt = time.perf_counter() - self.t0
            mem = _peak_memory_mb()
            console("INFO", f"step {info.step}: {self.samples / dt:.2f} samples/s, {self.tokens / dt:.0f} tokens/s, "
                    f"peak memory {mem:.0f} MB")
            self.t0, self.samples, self.tokens = time.perf_counter(), 0, 0


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SaveDelayConfig(ComponentConfig):
    """Options of the `save_delay` callback: the first step that may save a periodic checkpoint, given as
    `steps` or as `epochs` (exactly one)."""

    type: str = "save_delay"
    steps: int | None = Field(None, ge=0, description="no checkpoints before this step (except on SIGTERM and at "
                                                      "the end)")
    epochs: float | None = Field(None, ge=0, description="no checkpoints before this many epochs: step "
                                                         "ceil(epochs x the trainer's steps per epoch)")

    @model_validator(mode="after")
    def _one_of(self) -> SaveDelayConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps (a step number) or epochs (a number of epochs, e.g. 1.5)"
                             + (f"; got steps: {self.steps} and epochs: {self.epochs}" if self.steps is not None
                                else ""))
        return self


@CALLBACKS.register("save_delay")
class SaveDelay(Callback):
    """Skips periodic checkpoints during the first `steps` steps, or the first `epochs` epochs (converted with the
    trainer's `steps_per_epoch`, rounded up); early checkpoints are rarely worth the I/O."""

    config_class = SaveDelayConfig

    def on_train_start(self, trainer: Any) -> None:
        """Set `trainer.save_not_before`, which the trainer's periodic saves respect."""
        trainer.save_not_before = self.first_step(trainer)

    def first_step(self, trainer: Any) -> int:
        """The first step that may save: `steps`, or ceil(`epochs` x trainer.steps_per_epoch())."""
        if self.config.steps is not None:
            return self.config.steps
        # an epoch count times the step count of an epoch, rounded up: 1.5 epochs of 7 steps may save from step 11
        return math.ceil(self.config.epochs * trainer.steps_per_epoch() - 1e-9)

"""The training loop, top to bottom in one file.

Components are passed in (model bundle, data bundle, optimizer and scheduler factories, checkpointer,
callbacks, distributed backend); the loop only orders them. A subclass changes what a step computes by
overriding `loss` (and `count` / `step_counts` when it normalises by something else, `evaluate` for its own
metrics); everything else (accumulation, normalisation, clipping, the NaN guard, logging, checkpoints,
resume) is here.

    train -> for each step's micro-batches: train_step -> forward_backward -> optimizer_step -> log_step
             -> maybe_evaluate -> maybe_save; then finish (save, export, evaluate)

Loss normalisation (the batch contract, `arctic_vl.batch`): the loss of an optimizer step is the mean over
ALL units (label tokens for the LM loss) of the whole accumulated batch on all processes. Each micro-batch
contributes `loss_sum / counts.units`, with `counts` summed over processes before the first forward; the
gradient all-reduce averages over processes, so each rank also scales by world_size.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from arctic_vl.batch import NUM_SAMPLES, NUM_SLOTS, NUM_TOKENS, StepCounts
from arctic_vl.callbacks.base import CallbackList, StepInfo
from arctic_vl.callbacks.console import console
from arctic_vl.checkpoint.checkpointer import EXPORT_INFO_FILE
from arctic_vl.checkpoint.files import append_line, write_run_file
from arctic_vl.config.paths import ConfigPath
from arctic_vl.config.run_files import fresh_dir, remove_tree, replace_file
from arctic_vl.config.types import Seed
from arctic_vl.data.sampling import EpochBatchSampler
from arctic_vl.errors import ConfigError, DataError, RunFailed
from arctic_vl.models.flops import FlopsMeter
from arctic_vl.registry import TRAINERS, Component, ComponentConfig
from arctic_vl.trainers.loss import count_label_tokens
from arctic_vl.trainers.prefetch import Prefetcher
from arctic_vl.trainers.report import format_parameter_counts, format_results, format_step_line

#: evaluations during training (one line per evaluation, `step` the step after which it ran)
EVAL_FILE = "eval.jsonl"
#: `arctic_vl evaluate` results, each marked `"standalone": true`, `step` the step of the weights evaluated
STANDALONE_EVAL_FILE = "eval_standalone.jsonl"

#: settings that may differ on resume: they change neither the math nor the data order (a run directory
#: that was moved or copied resumes: its location is not part of the math)
RESUME_MAY_CHANGE = (
    "trainer.max_steps", "trainer.epochs", "trainer.progress_bar", "trainer.log_every_n_steps",
    "trainer.output_dir", "checkpoint.every_n_steps", "checkpoint.keep_last", "checkpoint.save_on_sigterm",
    "checkpoint.export_final", "data.num_workers", "data.cache", "data.cache_dir", "data.preprocess_workers",
    "trainer.prefetch", "trainer.compile", "callbacks", "eval", "trainer.resume",
    "trainer.group_grad_norms", "trainer.weight_norms", "trainer.detect_anomaly",  # monitors: no change to the math
    "trainer.peak_tflops",
)


class NanGuardConfig(BaseModel):
    """A step whose loss or gradient is not finite is skipped: no weight changes, the LR is lowered."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    lr_factor: float = Field(0.5, gt=0, le=1, description="multiply every group's LR by this after a skipped step")
    max_consecutive: int = Field(3, ge=1, description="stop the run (exit 1) after this many skipped steps in a row")


class CompileConfig(BaseModel):
    """torch.compile of the step's decoder layers (regional compilation, see `arctic_vl.models.compile`);
    `trainer.compile: true` is `{enabled: true}`. Single process, DDP and ZeRO-1/2."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    dynamic: bool | None = Field(True, description="symbolic sequence lengths from the first step: padded and packed "
                                 "batches change length every step (None: torch decides after a recompile)")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"


class TrainerConfig(ComponentConfig):
    """The loop's settings (every trainer's config derives from it)."""

    type: str = "sft"
    output_dir: ConfigPath = Field("runs/run", description="relative to the config file unless absolute")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: Seed = 42
    bf16: bool = Field(False, description="bf16 autocast (where the device supports it)")
    loss_chunk_size: int = Field(2048, ge=16, description="label positions per output-layer chunk (memory-lean loss)")
    log_every_n_steps: int = Field(1, ge=1, description="console log interval; metrics.jsonl gets every step")
    progress_bar: bool = True
    resume: Literal["auto", "never", "must"] = Field(
        "auto", description="a run directory that holds a run: auto continues it (and says so, with the settings "
        "that changed), never refuses it (a new run wants a new output_dir), must refuses a start with nothing "
        "to resume")
    nan_guard: NanGuardConfig = Field(default_factory=NanGuardConfig)
    group_grad_norms: bool = Field(False, description="log each optimizer parameter group's gradient norm before "
                                   "clipping (`grad_norm/<group>` in metrics.jsonl; every backend, ZeRO 1-3 too)")
    weight_norms: bool = Field(False, description="log each optimizer parameter group's weight norm after the step "
                               "(`weight_norm/<group>` in metrics.jsonl)")
    detect_anomaly: bool = Field(False, description="autograd anomaly mode (debugging: slow): the backward op that "
                                 "first makes a NaN is named, with the forward line that created it")
    prefetch: bool = Field(True, description="read and collate the next step's micro-batches in a background "
                           "thread while this step computes (the same batches in the same order)")
    compile: CompileConfig = Field(default_factory=CompileConfig, description="torch.compile the step")
    peak_tflops: float | None = Field(None, gt=0, description="the device's peak TFLOPS for `mfu` (None: the "
                                      "table of known GPUs, else a matmul probe at start; docs/flops.md)")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, epoch, and micro-batches of that epoch consumed.

    `extra` is saved with every checkpoint; a trainer may keep its own resumable counters there.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossOutput:
    """What `Trainer.loss` returns for one micro-batch.

    `loss_sum`: the SUM of the loss over this micro-batch's units (a scalar tensor with a graph); the loop
    divides the step's total by the global `counts.units`, never by a per-micro-batch mean.
    `count`: this micro-batch's units (equal to `Trainer.count(batch)`; reported, not used to normalise).
    `metrics`: side metrics as name -> (sum, count); the loop sums both over micro-batches and processes and
    logs sum / count (e.g. a KL term averaged over its own tokens).
    """

    loss_sum: torch.Tensor
    count: int
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


class StepOutput(NamedTuple):
    """A LossOutput as the step module returns it: a named tuple, which the backends' output hooks look into
    (DeepSpeed's ZeRO-3 hooks find the loss tensor in it and warn about a dataclass they cannot look into)."""

    loss_sum: torch.Tensor
    count: int
    metrics: dict[str, tuple[float, float]]


class _StepModule(torch.nn.Module):
    """Model + loss as one module, so DDP/DeepSpeed see the whole forward through their wrapper."""

    def __init__(self, model: torch.nn.Module, trainer: Trainer):
        super().__init__()
        self.model = model
        self._trainer = [trainer]  # a list: not a submodule

    def forward(self, batch: dict[str, Any], counts: StepCounts) -> StepOutput:
        out = self._trainer[0].loss(self.model, batch, counts)
        return StepOutput(out.loss_sum, out.count, out.metrics)


class Trainer(Component):
    """The loop. Subclasses override `loss` (and `count` / `step_counts` when they normalise by something else).

    Built by the engine with every component passed in: `model_bundle` (ModelBundle), `data_bundle`
    (DataBundle: datasets, collator, batching settings), `optimizer_factory` / `scheduler_factory` (the
    registered Optimizer / Scheduler: they build the torch objects once the parameters are grouped),
    `checkpointer`, `callbacks`, `dist` (the distributed backend), `eval_config` (the `eval:` section),
    `run_config` (the resolved config as plain data: saved with checkpoints, compared on resume) and
    `model_factory` (for the export).
    """

    config_class = TrainerConfig
    config: TrainerConfig

    def __init__(self, config: TrainerConfig, *, model_factory: Any, model_bundle: Any, data_bundle: Any,
                 optimizer_factory: Any, scheduler_factory: Any, checkpointer: Any, callbacks: list[Any],
                 dist: Any, eval_config: Any, run_config: dict[str, Any]):
        self.config = config
        self.model_factory = model_factory
        self.bundle = model_bundle
        self.data = data_bundle
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.checkpointer = checkpointer
        self.callbacks = CallbackList(callbacks)
        self.dist = dist
        self.eval_config = eval_config
        self.run_config = run_config
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        self.save_not_before = 0
        self._stop_signal: int | None = None  # set by this process's signal handler
        self._stopping = False  # every process agreed to stop before the next step (`stop_requested`)
        self._last_results: dict[str, Any] | None = None
        self._last_ckpt: Path | None = None
        self._last_loss = math.nan
        #: the LossOutput.metrics names of the last step (the step line shows them next to the loss)
        self._loss_components: list[str] = []
        self._first_step = 1  # the first step of this start: its line shows the run is moving
        self.device = dist.device
        #: True while `evaluate_standalone` runs (`arctic_vl evaluate`): callbacks keep it apart from training
        self.standalone_evaluation = False

    # ------------------------------------------------------------------------------ what a step computes
    def loss(self, model: torch.nn.Module, batch: dict[str, Any], counts: StepCounts) -> LossOutput:
        """The SUM of the loss over this micro-batch's units (label tokens for SFT).

        `batch` follows `arctic_vl.Batch`; `counts` are the step's global normalisers (in evaluation: this
        batch's own), for a loss with a second normaliser (`counts["name"]` from `step_counts`).
        """
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> int:
        """Units the loss is averaged over (label tokens after the shift), counted before any forward."""
        return count_label_tokens(batch["labels"])

    def step_counts(self, micro: list[dict[str, Any]]) -> dict[str, float]:
        """Extra normalisers of one optimizer step: name -> this process's count over its micro-batches.

        The loop sums them over processes before the first forward and passes the global values to every
        `loss(..., counts)` call of the step (`counts["name"]`), so a loss with a second normaliser (e.g. an
        MSE over non-padding tokens next to a KL over label tokens) is exact over the whole accumulated batch.
        """
        return {}

    def local_counts(self, micro: list[dict[str, Any]]) -> StepCounts:
        """This process's counts of `micro` (what evaluation passes to `loss`, one batch at a time)."""
        return StepCounts(float(sum(self.count(b) for b in micro)), dict(self.step_counts(micro)))

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Metrics on the eval data (default: eval loss, and exact match with `eval.generate`).

        Every rank calls it; the returned numbers must already be reduced over processes. Override it for a
        trainer's own metrics (call `super().evaluate(model)` to keep the loss).
        """
        from arctic_vl.trainers.evaluate import evaluate

        return evaluate(self, model)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        """True on the process that writes files and logs (rank 0)."""
        return self.dist.is_main

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches per rank in epoch 0's plan."""
        return len(self.plan(0))

    def plan(self, epoch: int) -> list[list[list[Any]]]:
        """Every rank's micro-batches of `epoch` (deterministic in seed and epoch)."""
        return self.data.plan(epoch, self.dist.world_size, self.config.seed)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch: micro-batches per epoch over gradient_accumulation_steps, rounded up."""
        return math.ceil(self.micro_batches_per_epoch / self.config.gradient_accumulation_steps)

    def epoch_start_step(self, epoch: int) -> int:
        """The 0-based optimizer step that begins `epoch` (each epoch's last step may take fewer micro-batches)."""
        gas = self.config.gradient_accumulation_steps
        return sum(math.ceil(len(self.plan(e)) / gas) for e in range(epoch))

    def compute_total_steps(self) -> int:
        """`max_steps` if set, else the optimizer steps of `epochs` epochs (a fraction: part of one); at least 1."""
        if self.config.max_steps is not None:
            return self.config.max_steps
        if self.data.batcher is not None:  # e.g. packing: each epoch's packs give it its own micro-batch count
            gas, whole = self.config.gradient_accumulation_steps, int(self.config.epochs)
            steps = sum(math.ceil(len(self.plan(e)) / gas) for e in range(whole))
            if self.config.epochs > whole:
                steps += math.ceil((self.config.epochs - whole) * math.ceil(len(self.plan(whole)) / gas))
            return max(1, steps)
        return max(1, math.ceil(self.config.epochs * self.steps_per_epoch()))

    def loader(self, epoch: int, start: int) -> torch.utils.data.DataLoader:
        """This rank's batches of `epoch`, from micro-batch `start` on (resume starts there; nothing is replayed)."""
        if hasattr(self.data.train, "set_epoch"):
            self.data.train.set_epoch(epoch)
        sampler = EpochBatchSampler(self.plan(epoch), self.dist.world_size, self.dist.rank, start)
        return torch.utils.data.DataLoader(self.data.train, batch_sampler=sampler, collate_fn=self.data.collate,
                                           num_workers=self.data.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def prefetched(self, batches: Iterator[dict[str, Any]]) -> Prefetcher:
        """`batches`, read one step (`gradient_accumulation_steps` micro-batches) ahead in a background thread
        unless `prefetch` is off: the next step's data is made while this step computes. Same batches, same order."""
        return Prefetcher(batches, depth=self.config.gradient_accumulation_steps if self.config.prefetch else 0)

    def stop_requested(self) -> bool:
        """Whether the run stops before its next step: a stop signal (SIGTERM) reached this process or, with
        several processes, any of them. The processes agree with one all-reduce of their flags at the step
        boundary, so they all save the same checkpoint and exit together: a process that stopped alone would
        wait in the checkpoint's collectives while the others ran the next step's."""
        local = self._stop_signal is not None
        agreed = local if self.dist.world_size == 1 else self.dist.all_reduce_sum([float(local)])[0] > 0
        self._stopping = self._stopping or bool(agreed)
        return self._stopping

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with its tensors on this rank's device (non-blocking); other values as they are."""
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @contextlib.contextmanager
    def anomaly_mode(self) -> Iterator[None]:
        """With `trainer.detect_anomaly`: autograd anomaly mode around a micro-batch's forward and backward; the
        error it raises at the first NaN becomes a RunFailed naming the step and the op."""
        if not self.config.detect_anomaly:
            yield
            return
        try:
            with torch.autograd.detect_anomaly(check_nan=True):
                yield
        except RuntimeError as e:
            if "nan" not in str(e).lower():
                raise
            raise RunFailed(f"step {self.state.step + 1}: trainer.detect_anomaly: {str(e).splitlines()[0]} (the "
                            "forward line that created this op is in the warning above)") from None

    def autocast(self) -> Any:
        """bf16 autocast on the device when `trainer.bf16`, else a no-op context."""
        if self.config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Train to the configured length, resuming from the latest checkpoint; returns a summary."""
        latest = self.setup()
        if (latest is not None and self.state.step >= self.total_steps
                and (self.output_dir / "final" / "config.json").is_file()):
            if self.is_main:
                logger.info(f"run already finished at step {self.state.step} (checkpoint {latest}); "
                            f"outputs in {self.output_dir}")
            return self.summary(latest, already_finished=True)
        with self.run_events():
            self.callbacks.on_train_start(self)
            self._first_step = self.state.step + 1
            for micro, data_time in self.step_batches():
                metrics = self.train_step(micro, data_time)
                self.log_step(metrics)
                self.maybe_evaluate()
                self.maybe_save()
            if self._stopping:
                return self.stop()
            return self.finish()

    @contextlib.contextmanager
    def run_events(self) -> Iterator[None]:
        """`on_run_start` ... `on_run_end(failed)` around a training run or a standalone evaluation."""
        self.callbacks.on_run_start(self)
        failed = True
        try:
            yield
            failed = False
        finally:
            self.callbacks.on_run_end(self, failed)

    def evaluate_standalone(self, step: int) -> dict[str, Any]:
        """`arctic_vl evaluate`: one evaluation outside training of the weights of `step` (the run's export),
        written to eval_standalone.jsonl (marked `"standalone": true`), never to the training-time eval.jsonl."""
        self.state.step = step
        self.standalone_evaluation = True
        with self.run_events():
            return self.run_evaluation()

    def setup(self) -> Path | None:
        """Group parameters, build optimizer and scheduler, wrap for the backend, resume; the checkpoint or None."""
        torch.manual_seed(self.config.seed)
        if self.is_main:  # before the backend wraps (ZeRO-3 partitions) the model
            logger.info(format_parameter_counts(self.bundle.parameter_counts()))
        groups = self.optimizer_factory.param_groups(self.bundle.model, self.bundle.part_of)
        optimizer = self.optimizer_factory.build(groups)
        self.total_steps = self.compute_total_steps()
        scheduler = self.scheduler_factory.build(optimizer, self.total_steps, epoch_start=self.epoch_start_step)
        if self.is_main:
            warning = _schedule_warning(self.scheduler_factory, self.total_steps)
            if warning:
                logger.warning(warning)
        dtype = torch.bfloat16 if self.config.bf16 else torch.float32  # the matmul probe's (CPU) dtype
        self.flops = FlopsMeter(self.bundle.model, self.bundle.part_of, self.bundle.family, torch.device(self.device),
                                dtype, self.config.peak_tflops)  # before ZeRO-3 partitions the weights
        if self.is_main:
            logger.info(f"peak {self.flops.peak_tflops:.3g} TFLOPS per device for mfu ({self.flops.peak_source})")
        self.model, self.optimizer, self.scheduler = self.dist.prepare(self.step_module(), optimizer, scheduler)
        latest = self._resume_or_start()
        if latest is not None:
            saved = self.checkpointer.load(latest, model=self.model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, dist=self.dist)
            self.state = TrainState(saved["step"], saved["epoch"], saved["batch_in_epoch"], saved.get("extra", {}))
            if self.data.report is not None:  # records found bad while loading batches before the checkpoint
                self.data.report.add_late_entries(self.state.extra.get("bad_records", []))
        self._last_ckpt = latest
        if self.is_main:
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.state.step)
        self._install_signal_handlers()
        return latest

    def step_module(self) -> torch.nn.Module:
        """Model + loss as one module for the backend to wrap; with `compile`, the language model's decoder layers
        are compiled in place first (`arctic_vl.models.compile`: parameter names and checkpoints do not change)."""
        c = self.config.compile
        if c.enabled:
            from arctic_vl.models.compile import compile_decoder_layers

            if getattr(self.dist.config, "zero_stage", 0) == 3:
                raise ConfigError("trainer.compile does not work with DeepSpeed ZeRO-3 (its parameter gathering "
                                  "hooks cannot be compiled); use zero_stage 2 or trainer.compile: false")
            n = compile_decoder_layers(self.bundle.model, dynamic=c.dynamic,
                                       mode=None if c.mode == "default" else c.mode)
            if self.is_main:
                logger.info(f"trainer.compile: {n} decoder layers compiled (dynamic={c.dynamic}); the first step "
                            "compiles them (tens of seconds on CPU)")
        return _StepModule(self.bundle.model, self)

    def step_batches(self) -> Iterator[tuple[list[dict[str, Any]], float]]:
        """Each optimizer step's micro-batches (on the device) and the seconds spent waiting for them, epoch
        after epoch from the resumed position, until the run's length or a stop signal."""
        gas = self.config.gradient_accumulation_steps
        while self.state.step < self.total_steps and not self._stopping:
            epoch, start = self.state.epoch, self.state.batch_in_epoch
            self._per_epoch = len(self.plan(epoch))  # may differ by epoch with a batcher (packing)
            if self._per_epoch == 0:
                raise DataError(f"epoch {epoch} has no micro-batches: the training data is empty")
            if start >= self._per_epoch:
                raise DataError(f"epoch {epoch} has {self._per_epoch} micro-batches but the run is at micro-batch "
                                f"{start} of it: the training data changed since the checkpoint")
            with self.prefetched(iter(self.loader(epoch, start))) as batches:
                while self.state.step < self.total_steps and self.state.epoch == epoch and not self.stop_requested():
                    t_data = time.perf_counter()
                    # samples that turned out bad as they loaded are counted (skip) or kept to raise (error) here,
                    # in the loop's thread, so the counts saved with a checkpoint match the steps taken
                    micro = [self.to_device(self.data.accept(b)) for _, b in zip(range(gas), batches)]
                    if not micro:  # the plan promised more micro-batches than the loader gave: never spin on it
                        raise RunFailed(f"epoch {epoch} yielded no micro-batch at position "
                                        f"{self.state.batch_in_epoch} of {self._per_epoch}; "
                                        "the data loader ended early")
                    yield micro, time.perf_counter() - t_data

    def train_step(self, micro: list[dict[str, Any]], data_time: float) -> dict[str, Any]:
        """One optimizer step over `micro`: global counts, forward/backward, optimizer step; the metrics line."""
        t_step = time.perf_counter()
        epoch = self.state.epoch
        local = [float(sum(b[NUM_TOKENS] for b in micro)), float(sum(b[NUM_SAMPLES] for b in micro)),
                 float(sum(b.get(NUM_SLOTS, 0) for b in micro)),  # packed rows x max_length
                 float(self.data.pending_error is not None)]  # a bad sample under on_bad_record: error
        own = self.local_counts(micro)
        names = sorted(own.extra)
        n_units, n_tokens, n_samples, n_slots, n_bad, llm_flops, vision_flops, *n_extra = self.dist.all_reduce_sum(
            [own.units, *local, *self.flops.local(micro), *(own.extra[k] for k in names)])
        if n_bad:  # every process stops together (exit 2), none waits in a collective
            self.data.raise_pending(n_bad)
        counts = StepCounts(n_units, dict(zip(names, n_extra)))
        loss_sum, side = self.forward_backward(micro, counts)
        side_names = sorted(side)
        self._loss_components = side_names
        reduced = self.dist.all_reduce_sum([loss_sum] + [v for k in side_names for v in side[k]])
        loss = reduced[0] / max(n_units, 1.0)
        lr = self.optimizer.param_groups[0]["lr"]
        group_lrs: dict[str, float] = {}
        for group in self.optimizer.param_groups:  # the decay and no-decay halves of a group share their LR
            group_lrs.setdefault(f"lr/{str(group.get('name', 'default')).split('/', 1)[0]}", group["lr"])
        grad_norm, group_norms, skipped = self.optimizer_step(loss)
        self._last_loss = loss
        self.state.step += 1
        self.state.batch_in_epoch += len(micro)
        if self.state.batch_in_epoch >= self._per_epoch:
            self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
        elapsed = time.perf_counter() - t_step + data_time
        metrics = {
            "step": self.state.step, "epoch": epoch, "loss": loss if math.isfinite(loss) else None, "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "tokens": int(n_tokens), "label_tokens": int(n_units), "samples": int(n_samples),
            "tokens_per_s": n_tokens / max(elapsed, 1e-9), "samples_per_s": n_samples / max(elapsed, 1e-9),
            "step_time_s": elapsed - data_time, "data_time_s": data_time,
        }
        metrics.update(self.flops.metrics(llm_flops, vision_flops, elapsed, self.dist.world_size))
        if n_slots:
            metrics["packing_efficiency"] = n_tokens / n_slots
        metrics.update(group_lrs)
        metrics.update({f"grad_norm/{k}": v for k, v in group_norms.items()})
        if self.config.weight_norms:  # after the step: the weights the next step starts from
            metrics.update({f"weight_norm/{k}": v
                            for k, v in self.dist.group_weight_norms(self.model, self.optimizer).items()})
        if self.config.nan_guard.enabled:
            metrics["nan_skips"] = int(self.state.extra.get("nan_skips", 0))
            if skipped:
                metrics["skipped"] = True
        for j, k in enumerate(side_names):
            s, c = reduced[1 + 2 * j], reduced[2 + 2 * j]
            metrics[k] = s / c if c else None
        return metrics

    def forward_backward(
        self, micro: list[dict[str, Any]], counts: StepCounts
    ) -> tuple[float, dict[str, tuple[float, float]]]:
        """Forward and backward of every micro-batch, gradients scaled to the step's global mean; returns this
        process's summed loss and side metrics (name -> (sum, count))."""
        scale = self.dist.world_size / max(counts.units, 1.0)
        self.model.train()
        loss_sum, side = 0.0, {}
        for i, batch in enumerate(micro):
            with self.dist.no_sync(self.model, sync=i == len(micro) - 1), self.autocast(), self.anomaly_mode():
                out: StepOutput = self.model(batch, counts)
                self.dist.backward(self.model, out.loss_sum * scale)
            loss_sum += float(out.loss_sum.detach())
            for k, (s, c) in out.metrics.items():
                ps, pc = side.get(k, (0.0, 0.0))
                side[k] = (ps + s, pc + c)
        return loss_sum, side

    def optimizer_step(self, loss: float) -> tuple[float, dict[str, float], bool]:
        """Clip and step (or skip a non-finite step under the NaN guard); (grad norm, per-group norms, skipped)."""
        guard = self.config.nan_guard
        group_norms = self.dist.group_grad_norms(self.model, self.optimizer) if self.config.group_grad_norms else {}
        grad_norm, stepped = self.dist.step(self.model, self.optimizer, self.scheduler, self.config.max_grad_norm,
                                            skip_nonfinite=guard.enabled, loss_finite=math.isfinite(loss))
        if not guard.enabled:
            return grad_norm, group_norms, False
        extra = self.state.extra
        if stepped:
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise RunFailed(f"step {self.state.step + 1}: the loss ({loss}) or gradient norm ({grad_norm}) is "
                                "not finite and the backend applied the step anyway; the weights are no longer "
                                "finite. Resume from the last checkpoint with a lower optimizer.lr")
            extra["nan_consecutive"] = 0
            return grad_norm, group_norms, False
        extra["nan_skips"] = int(extra.get("nan_skips", 0)) + 1
        extra["nan_consecutive"] = int(extra.get("nan_consecutive", 0)) + 1
        # Lower the LR for good: the scheduler's base LRs (saved with it, so resume is exact) and this step's.
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * guard.lr_factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= guard.lr_factor
        if self.is_main:
            console("WARNING", f"step {self.state.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                    f"step skipped (weights unchanged), LR x{guard.lr_factor} "
                    f"({extra['nan_consecutive']} in a row, {extra['nan_skips']} in all)")
        if extra["nan_consecutive"] >= guard.max_consecutive:
            raise RunFailed(
                f"step {self.state.step + 1}: {extra['nan_consecutive']} consecutive steps had a non-finite loss or "
                f"gradient (trainer.nan_guard.max_consecutive: {guard.max_consecutive}); stopping. Check the data "
                "of these steps (inspect-data), lower optimizer.lr or raise warmup, set trainer.max_grad_norm, "
                "or train in float32 instead of bf16. The latest checkpoint is intact")
        return grad_norm, group_norms, True

    def log_step(self, metrics: dict[str, Any]) -> None:
        """One metrics.jsonl line (main process), the console line, and the step callbacks."""
        if self.is_main:
            append_line(self.output_dir / "metrics.jsonl", json.dumps(metrics))
            step = self.state.step
            # without the bar the step lines are the run's only sign of life: every log_every_n_steps, the first
            # step of this start and the last one (a run shorter than the interval still shows its steps)
            if not self.config.progress_bar and (step % self.config.log_every_n_steps == 0 or step == self._first_step
                                                 or step == self.total_steps):
                logger.info(format_step_line(step, self.total_steps, metrics,
                                             [k for k in self._loss_components if k in metrics]))
        self.callbacks.on_step_end(self, StepInfo(self.state.step, self.total_steps, metrics["epoch"], metrics))
        self.callbacks.on_log(self, metrics)

    def maybe_evaluate(self) -> None:
        """Evaluate every `eval.every_n_steps` steps (when there is eval data)."""
        every = self.eval_config.every_n_steps
        if every and self.state.step % every == 0 and self.data.eval is not None:
            self.run_evaluation()

    def maybe_save(self) -> None:
        """Checkpoint every `checkpoint.every_n_steps` steps (not before `save_not_before`, not at the last step:
        `finish` saves that one)."""
        every = self.checkpointer.config.every_n_steps
        step = self.state.step
        if every and step % every == 0 and step >= self.save_not_before and step < self.total_steps:
            self._last_ckpt = self.save()

    def stop(self) -> dict[str, Any]:
        """After a stop signal: save (unless disabled) and return a summary; rerunning the command resumes."""
        if self.checkpointer.config.save_on_sigterm:
            self._last_ckpt = self.save()
        if self.is_main:
            by = f"signal {self._stop_signal}" if self._stop_signal is not None else "a stop signal to another process"
            logger.warning(f"stopped by {by} at step {self.state.step}; "
                           f"checkpoint {self._last_ckpt}. Run the same command to resume.")
        summary = self.summary(self._last_ckpt, stopped=True, final_loss=self._last_loss)
        self.callbacks.on_train_end(self, summary)
        return summary

    def finish(self) -> dict[str, Any]:
        """The last checkpoint, the export, the final evaluation (unless the periodic one just ran), the summary."""
        self._last_ckpt = self.save()
        export = self.export()
        every = self.eval_config.every_n_steps
        just_done = every and self.state.step % every == 0 and self._last_results is not None
        results = self._last_results if just_done else (self.run_evaluation() if self.data.eval is not None else None)
        summary = self.summary(self._last_ckpt, final_loss=self._last_loss, export=export, eval=results)
        self.callbacks.on_train_end(self, summary)
        if self.is_main and self.data.report is not None and self.data.report.total:
            logger.warning(f"skipped records in this run: {self.data.report.format()}")
        return summary

    # -------------------------------------------------------------------------------------------- resume
    def _resume_or_start(self) -> Path | None:
        self._model_fingerprint = model_fingerprints(self)  # saved with every checkpoint
        latest = self.checkpointer.latest()
        _check_resume_policy(self.config.resume, self.output_dir, latest)
        if latest is None:
            return None
        saved = self.checkpointer.read_state(latest)
        if self.is_main:  # what this start continues, and what it changes (before a refusal, which names its own)
            logger.info(_resume_notice(latest, saved, self.run_config, self.total_steps))
        changed = _config_changes(saved.get("config", {}), self.run_config)
        if changed:
            raise ConfigError(
                f"{self.output_dir}: cannot resume from {latest.name}: these settings differ from the saved run: "
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:10])
                + ". Only the run length (trainer.max_steps, trainer.epochs), the output location and "
                "logging/checkpoint cadence may change. Use a new trainer.output_dir for a new run."
            )
        saved_ws = saved.get("world_size", self.dist.world_size)
        if saved_ws != self.dist.world_size:  # the data plan and global batch depend on it; ZeRO state is sharded
            raise ConfigError(
                f"{self.output_dir}: cannot resume from {latest.name}: it was saved by {saved_ws} processes "
                f"and this run has {self.dist.world_size}. Resume with {saved_ws} processes, or start a new run (new "
                "trainer.output_dir) from the exported weights."
            )
        _check_data_fingerprint(latest.name, saved.get("data_fingerprint"), self.data.fingerprint)
        _check_model_fingerprints(latest.name, saved.get("model_fingerprint"), self._model_fingerprint)
        return latest

    # ---------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Write the step-N checkpoint (weights, optimizer, scheduler, trainer state, bad records); returns its path."""
        self._gather_bad_records()
        state = {**asdict(self.state), "config": self.run_config, "world_size": self.dist.world_size,
                 "data_fingerprint": self.data.fingerprint,
                 "model_fingerprint": getattr(self, "_model_fingerprint", None) or model_fingerprints(self)}
        path = self.checkpointer.save(step=self.state.step, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, trainer_state=state, dist=self.dist)
        self.callbacks.on_save(self, str(path))
        return path

    def export(self) -> Path | None:
        """Write OUTPUT_DIR/final (an HF directory, atomically); returns its path, None when `export_final` is off."""
        if not self.checkpointer.config.export_final:
            return None
        full = self.dist.full_state_dict(self.model)
        out = self.output_dir / "final"
        if self.is_main:
            tmp = fresh_dir(self.output_dir / ".tmp-final")  # a link at .tmp-final or final/: refused, not followed
            module = self.dist.unwrap(self.model).model
            if full is not None:
                full = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            self.model_factory.export(self.bundle, module, tmp, state_dict=full)
            # which weights these are: what a standalone evaluation of final/ records as its step
            source = self._last_ckpt.name if self._last_ckpt is not None else None
            replace_file(tmp / EXPORT_INFO_FILE, json.dumps({"step": self.state.step, "epoch": self.state.epoch,
                                                             "checkpoint": source}))
            remove_tree(out)
            tmp.rename(out)
        self.dist.barrier()
        return out

    def _gather_bad_records(self) -> None:
        """Every process's records found bad while loading batches, on every process and in the saved state."""
        report = self.data.report
        if not hasattr(report, "late_entries"):  # None, or a plugin's own report
            return
        for entries in self.dist.all_gather_object(report.late_entries()):
            report.add_late_entries(entries)
        if report.late:
            self.state.extra["bad_records"] = report.late_entries()

    def summary(self, checkpoint: Path | None, **extra: Any) -> dict[str, Any]:
        """What `train` returns: steps, epoch, output_dir, checkpoint, skipped records by reason, plus `extra`."""
        self._gather_bad_records()
        out = {"steps": self.state.step, "epoch": self.state.epoch, "output_dir": str(self.output_dir),
               "checkpoint": str(checkpoint) if checkpoint else None,
               "skipped_records": self.data.report.by_reason() if self.data.report is not None else {}}
        out.update(extra)
        if isinstance(out.get("export"), Path):
            out["export"] = str(out["export"])
        return out

    # ----------------------------------------------------------------------------------------- evaluation
    def run_evaluation(self) -> dict[str, Any]:
        """`evaluate` on the unwrapped model, appended to eval.jsonl (eval_standalone.jsonl outside training) and
        printed (main process), and sent to the callbacks."""
        module = self.dist.unwrap(self.model).model if hasattr(self, "model") else self.bundle.model
        results = self.evaluate(module)
        if self.is_main:
            line = {"step": self.state.step, **({"standalone": True} if self.standalone_evaluation else {}), **results}
            name = STANDALONE_EVAL_FILE if self.standalone_evaluation else EVAL_FILE
            append_line(self.output_dir / name, json.dumps(line))
            what = "standalone evaluation" if self.standalone_evaluation else "evaluation"
            console("INFO", f"{what} at step {self.state.step}:{format_results(results, more_in=name)}")
        self.callbacks.on_evaluate(self, results)
        self._last_results = results
        return results

    # -------------------------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            self._stop_signal = signum

        # not the main thread (e.g. a notebook worker): no graceful stop, nothing else changes
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, handler)


TRAINERS.bind_base(Trainer)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _schedule_warning(scheduler_factory: Any, total: int) -> str | None:
    """A warning when the LR schedule never reaches its peak within the run's `total` steps (a warmup as long as
    the run, or longer): the run then trains at a fraction of `optimizer.lr` throughout."""
    factor = getattr(scheduler_factory, "factor", None)
    if not callable(factor):
        return None
    try:
        peak = max(float(factor(s, total)) for s in range(min(total, 1_000_000)))
    except (TypeError, ValueError):  # a scheduler whose factor is not (step, total) -> multiplier
        return None
    if peak >= 1.0 - 1e-9:
        return None
    config = getattr(scheduler_factory, "config", None)
    warmup = getattr(config, "warmup_steps", None)
    ratio = getattr(config, "warmup_ratio", 0.0)
    cause = (f"scheduler.warmup_steps {warmup} is not below the run's {total} steps" if warmup is not None
             else f"scheduler.warmup_ratio {ratio} of the run's {total} steps" if ratio else
             f"it stays below its peak over the run's {total} steps")
    return (f"the LR schedule never reaches its peak: {cause}, so the highest LR is {100 * peak:.0f}% of "
            "optimizer.lr; lower the warmup or raise trainer.max_steps")


def _check_resume_policy(policy: str, output_dir: Path, latest: Path | None) -> None:
    """`trainer.resume`: never refuses a directory that holds a run (a checkpoint or final/), must one that holds
    nothing to resume (exit 2, naming the directory)."""
    if policy == "never":
        held = [what for what, there in (("checkpoint " + latest.name if latest else "", latest is not None),
                                         ("final/", (output_dir / "final").is_dir())) if there]
        if held:
            raise ConfigError(f"trainer.resume: never, but {output_dir} already holds a run ({', '.join(held)}); "
                              "name a new trainer.output_dir for a new run, or set trainer.resume: auto to continue "
                              "that one")
    elif policy == "must" and latest is None:
        raise ConfigError(f"trainer.resume: must, but {output_dir} holds no checkpoint to resume from; check "
                          "trainer.output_dir, or set trainer.resume: auto to start a new run there")


def _resume_notice(latest: Path, saved: dict[str, Any], new: dict[str, Any], total_steps: int) -> str:
    """`resuming from CHECKPOINT (step N of M, epoch E); changed: key old -> new; ...`: the settings that may
    change on resume and did (a rerun with another max_steps extends the run: say so before it does)."""
    a, b = _flatten(saved.get("config", {})), _flatten(new)
    changed = [f"{k} {_shown(a.get(k, '<unset>'))} -> {_shown(b.get(k, '<unset>'))}"
               for k in sorted(set(a) | set(b))
               if _may_change(k) and a.get(k, "<unset>") != b.get(k, "<unset>")]
    what = f"changed: {'; '.join(changed)}" if changed else "no setting changed"
    step = saved.get("step", 0)
    verb = "resuming from" if step < total_steps else "found the finished run's"
    return (f"{verb} {latest} (step {step} of {total_steps}, epoch {saved.get('epoch', 0)}); {what} "
            "(trainer.resume: never refuses a directory that holds a run)")


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if _may_change(key):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            changes.append((key, a.get(key, "<unset>"), b.get(key, "<unset>")))
    return changes


def _check_data_fingerprint(checkpoint: str, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse a resume whose training data differ from the checkpoint's (the saved position would be wrong)."""
    if not saved or not current:
        return
    for source in sorted(set(saved) | set(current)):
        old, new = saved.get(source), current.get(source)
        if old == new:
            continue
        if old is None or new is None:
            what = "was added" if old is None else "is gone"
            raise DataError(f"cannot resume from {checkpoint}: training source {source} {what} since the checkpoint; "
                            "resume with the same data, or start a new run (new trainer.output_dir)", source=source)
        # only what both recorded: a checkpoint of an older version lacks the newer keys (images, digest)
        diffs = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new)) if old[k] != new[k])
        if not diffs:
            continue
        raise DataError(f"cannot resume from {checkpoint}: training source {source} changed since the checkpoint "
                        f"({diffs}); resume with the same data, or start a new run (new trainer.output_dir)",
                        source=source)


def model_fingerprints(trainer: Any) -> dict[str, Any]:
    """Config key -> {dir, files: `model_fingerprint`} of every local model directory the run reads: the model
    factory's `source_dirs` and a trainer's `teacher_dir` (e.g. dense_caption's GKD teacher)."""
    from arctic_vl.models.model_dir import model_fingerprint

    dirs = dict(trainer.model_factory.source_dirs(trainer.output_dir)) if hasattr(trainer.model_factory,
                                                                                  "source_dirs") else {}
    teacher = getattr(trainer, "teacher_dir", None)
    if teacher is not None:
        dirs.setdefault("trainer.teacher", Path(teacher))
    return {key: {"dir": str(path), "files": model_fingerprint(path)} for key, path in dirs.items()
            if Path(path).is_dir()}


def _check_model_fingerprints(checkpoint: str, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse a resume whose model (or teacher) directory changed since the checkpoint: frozen weights are not in
    checkpoints, so the resumed run would train on another base model."""
    from arctic_vl.models.model_dir import fingerprint_changes

    for key in sorted(set(saved or {}) & set(current)):
        changes = fingerprint_changes(saved[key].get("files", {}), current[key]["files"])
        if changes:
            raise ConfigError(
                f"cannot resume from {checkpoint}: the model directory {current[key]['dir']} ({key}) changed since "
                f"the checkpoint: {'; '.join(changes)}. Frozen weights are not in checkpoints, so the run would go on "
                "from another base model: restore that directory, or start a new run (new trainer.output_dir)")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep lines of steps <= `step` (a resumed run rewrites the steps after its checkpoint exactly once).

    A torn last line (a kill in the middle of a write) is dropped with a warning; a corrupt line before it
    is an error naming the line.
    """
    if not path.is_file():
        return
    raw = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    kept = []
    for i, line in enumerate(raw):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if i == len(raw) - 1:
                logger.warning(f"{path}: dropping a torn last line (line {i + 1}: a kill during its write)")
                break
            raise RunFailed(f"{path}: line {i + 1} is not a JSON object; fix or remove that line to resume") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise RunFailed(f"{path}: line {i + 1} has no integer 'step'; fix or remove that line to resume")
        if entry["step"] <= step:
            kept.append(line)
    write_run_file(path, "".join(ln + "\n" for ln in kept))

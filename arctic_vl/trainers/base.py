"""The training loop, top to bottom in one file.

Components are passed in (model, data, optimizer and scheduler factories, checkpointer, callbacks,
distributed backend); the loop only orders them. Subclasses change what a step computes by overriding
`loss`; everything else (accumulation, normalisation, clipping, logging, checkpoints, resume) is here.

Loss normalisation: the loss of an optimizer step is the mean over ALL label tokens of the whole
accumulated batch on all processes. Each micro-batch contributes sum(token losses) / N_global, where
N_global is counted before the first backward; gradient all-reduce averages over processes, so each
rank scales by world_size.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from pydantic import Field

from arctic_vl.callbacks.base import CallbackList, StepInfo
from arctic_vl.config.paths import ConfigPath
from arctic_vl.config.types import Seed
from arctic_vl.data.base import EpochBatchSampler
from arctic_vl.errors import ConfigError
from arctic_vl.registry import Component, ComponentConfig
from arctic_vl.trainers.loss import count_label_tokens

#: settings that may differ on resume: they change neither the math nor the data order
RESUME_MAY_CHANGE = (
    "trainer.max_steps", "trainer.epochs", "trainer.progress_bar", "trainer.log_every_n_steps",
    "checkpoint.every_n_steps", "checkpoint.keep_last", "checkpoint.save_on_sigterm", "checkpoint.export_final",
    "data.num_workers", "callbacks", "eval",
)


class TrainerConfig(ComponentConfig):
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


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, epoch, and micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossOutput:
    """What `Trainer.loss` returns for one micro-batch: a SUM over `count` units, plus summed side metrics."""

    loss_sum: torch.Tensor
    count: int
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (sum, count)


class _StepModule(torch.nn.Module):
    """Model + loss as one module, so DDP/DeepSpeed see the whole forward through their wrapper."""

    def __init__(self, model: torch.nn.Module, trainer: Trainer):
        super().__init__()
        self.model = model
        self._trainer = [trainer]  # a list: not a submodule

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        return self._trainer[0].loss(self.model, batch)


class Trainer(Component):
    """The loop. Subclasses override `loss` (and `count` when they normalise by something else)."""

    config_class = TrainerConfig

    def __init__(self, config: TrainerConfig, engine_config: Any, *, model_factory: Any, model_bundle: Any,
                 data_bundle: Any, optimizer: Any, scheduler: Any, checkpointer: Any, callbacks: list[Any], dist: Any):
        self.config = config
        self.engine_config = engine_config
        self.model_factory = model_factory
        self.bundle = model_bundle
        self.data = data_bundle
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.checkpointer = checkpointer
        self.callbacks = CallbackList(callbacks)
        self.dist = dist
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        self.save_not_before = 0
        self._stop_signal: int | None = None
        self._last_results: dict[str, Any] | None = None
        self.device = dist.device
        #: global normalisers of the step being computed ("units" + `step_counts`); empty outside a step
        self.global_counts: dict[str, float] = {}

    # ------------------------------------------------------------------------------ what a step computes
    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        """Sum of the loss over this micro-batch's units (label tokens for SFT)."""
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> int:
        """Units the loss is averaged over (label tokens after the shift), counted before any forward."""
        return count_label_tokens(batch["labels"])

    def step_counts(self, micro: list[dict[str, Any]]) -> dict[str, float]:
        """Extra normalisers of one optimizer step: name -> this process's count over its micro-batches.

        The loop sums them over processes with `count` before the first forward and exposes the global values
        in `self.global_counts` (with `units`, the global `count` sum) while the step's `loss` calls run, so a
        loss with a second normaliser (e.g. an MSE over non-padding tokens next to a KL over label tokens) can
        rescale its term to be exact over the whole accumulated batch.
        """
        return {}

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.plan(0))

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """Every rank's micro-batches of `epoch` (deterministic in seed and epoch)."""
        d = self.engine_config.data
        if self.data.batcher is not None:
            return self.data.batcher(epoch, self.dist.world_size)
        return EpochBatchSampler.plan(len(self.data.train), d.micro_batch_size, self.dist.world_size,
                                      self.config.seed, epoch, getattr(d, "shuffle", True))

    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.config.gradient_accumulation_steps)

    def compute_total_steps(self) -> int:
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
        workers = self.engine_config.data.num_workers if hasattr(self.engine_config.data, "num_workers") else 0
        return torch.utils.data.DataLoader(self.data.train, batch_sampler=sampler, collate_fn=self.data.collate,
                                           num_workers=workers, pin_memory=self.device.type == "cuda")

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def autocast(self) -> Any:
        if self.config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -------------------------------------------------------------------------------------------- resume
    def _resume_or_start(self) -> Path | None:
        latest = self.checkpointer.latest()
        if latest is None:
            return None
        saved = self.checkpointer.read_state(latest)
        changed = _config_changes(saved.get("config", {}), self.engine_config.to_dict())
        if changed:
            raise ConfigError(
                f"{self.output_dir}: cannot resume from {latest.name}: these settings differ from the saved run: "
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:10])
                + ". Only the run length (trainer.max_steps, trainer.epochs) and logging/checkpoint cadence may change."
                " Use a new trainer.output_dir for a new run."
            )
        saved_ws = saved.get("world_size", self.dist.world_size)
        if saved_ws != self.dist.world_size:  # the data plan and global batch depend on it; ZeRO state is sharded
            raise ConfigError(
                f"{self.output_dir}: cannot resume from {latest.name}: it was saved by {saved_ws} processes and this run "
                f"has {self.dist.world_size}. Resume with {saved_ws} processes, or start a new run (new "
                "trainer.output_dir) from the exported weights."
            )
        return latest

    # ---------------------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """Train to the configured length, resuming from the latest checkpoint; returns a summary."""
        cfg, dist = self.config, self.dist
        torch.manual_seed(cfg.seed)
        model = self.bundle.model
        groups = self.optimizer_factory.param_groups(model, self.bundle.part_of)
        optimizer = self.optimizer_factory.build(groups)
        self.total_steps = self.compute_total_steps()
        scheduler = self.scheduler_factory.build(optimizer, self.total_steps)
        step_module = _StepModule(model, self)
        step_module, optimizer, scheduler = dist.prepare(step_module, optimizer, scheduler)
        self.model, self.optimizer, self.scheduler = step_module, optimizer, scheduler

        latest = self._resume_or_start()
        if latest is not None:
            saved = self.checkpointer.load(latest, model=step_module, optimizer=optimizer, scheduler=scheduler, dist=dist)
            self.state = TrainState(saved["step"], saved["epoch"], saved["batch_in_epoch"], saved.get("extra", {}))
            if self.state.step >= self.total_steps and (self.output_dir / "final" / "config.json").is_file():
                msg = f"run already finished at step {self.state.step} (checkpoint {latest}); outputs in {self.output_dir}"
                if self.is_main:
                    logger.info(msg)
                return self.summary(latest, already_finished=True)
            if self.is_main:
                logger.info(f"resuming from {latest} (step {self.state.step}, epoch {self.state.epoch})")
        metrics_file = self.output_dir / "metrics.jsonl"
        if self.is_main:
            _truncate_metrics(metrics_file, self.state.step)
        self._install_signal_handlers()
        self.callbacks.on_train_start(self)
        last_loss, last_ckpt = math.nan, latest
        gas = cfg.gradient_accumulation_steps
        eval_every = self.engine_config.eval.every_n_steps

        while self.state.step < self.total_steps and self._stop_signal is None:
            per_epoch = len(self.plan(self.state.epoch))  # may differ by epoch with a batcher (packing)
            batches = iter(self.loader(self.state.epoch, self.state.batch_in_epoch))
            while self.state.step < self.total_steps and self._stop_signal is None:
                t_data = time.perf_counter()
                micro = [b for _, b in zip(range(gas), batches)]
                if not micro:
                    break
                micro = [self.to_device(b) for b in micro]
                data_time = time.perf_counter() - t_data
                t_step = time.perf_counter()
                epoch = self.state.epoch
                local = [float(sum(self.count(b) for b in micro)),
                         float(sum(b["_num_tokens"] for b in micro)), float(sum(b["_num_samples"] for b in micro)),
                         float(sum(b.get("_num_slots", 0) for b in micro))]  # packed rows x max_length
                extra = self.step_counts(micro)
                n_units, n_tokens, n_samples, n_slots, *n_extra = dist.all_reduce_sum(
                    local + [float(extra[k]) for k in sorted(extra)])
                self.global_counts = {"units": n_units, **dict(zip(sorted(extra), n_extra))}
                scale = dist.world_size / max(n_units, 1.0)
                step_module.train()
                loss_sum, side = 0.0, {}
                for i, batch in enumerate(micro):
                    with dist.no_sync(step_module, sync=i == len(micro) - 1), self.autocast():
                        out: LossOutput = step_module(batch)
                        dist.backward(step_module, out.loss_sum * scale)
                    loss_sum += float(out.loss_sum.detach())
                    for k, (s, c) in out.metrics.items():
                        ps, pc = side.get(k, (0.0, 0.0))
                        side[k] = (ps + s, pc + c)
                self.global_counts = {}
                lr = optimizer.param_groups[0]["lr"]
                grad_norm = dist.step(step_module, optimizer, scheduler, cfg.max_grad_norm)
                names = sorted(side)
                reduced = dist.all_reduce_sum([loss_sum] + [v for k in names for v in side[k]])
                last_loss = reduced[0] / max(n_units, 1.0)
                self.state.step += 1
                self.state.batch_in_epoch += len(micro)
                if self.state.batch_in_epoch >= per_epoch:
                    self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
                step_time = time.perf_counter() - t_step
                metrics = {
                    "step": self.state.step, "epoch": epoch, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": int(n_tokens), "label_tokens": int(n_units), "samples": int(n_samples),
                    "tokens_per_s": n_tokens / max(step_time + data_time, 1e-9),
                    "samples_per_s": n_samples / max(step_time + data_time, 1e-9),
                    "step_time_s": step_time, "data_time_s": data_time,
                }
                if n_slots:
                    metrics["packing_efficiency"] = n_tokens / n_slots
                for j, k in enumerate(names):
                    s, c = reduced[1 + 2 * j], reduced[2 + 2 * j]
                    metrics[k] = s / c if c else None
                if self.is_main:
                    with open(metrics_file, "a") as fh:
                        fh.write(json.dumps(metrics) + "\n")
                    if self.state.step % cfg.log_every_n_steps == 0 and not cfg.progress_bar:
                        logger.info(f"step {self.state.step}/{self.total_steps} loss {last_loss:.4f} lr {lr:.2e}")
                self.callbacks.on_step_end(self, StepInfo(self.state.step, self.total_steps, epoch, metrics))
                self.callbacks.on_log(self, metrics)
                if eval_every and self.state.step % eval_every == 0 and self.data.eval is not None:
                    self.run_evaluation()
                every = self.checkpointer.config.every_n_steps
                if every and self.state.step % every == 0 and self.state.step >= self.save_not_before \
                        and self.state.step < self.total_steps:
                    last_ckpt = self.save()
                if self.state.batch_in_epoch == 0:
                    break  # epoch done: a fresh loader for the next one
        if self._stop_signal is not None:
            if self.checkpointer.config.save_on_sigterm:
                last_ckpt = self.save()
            if self.is_main:
                logger.warning(f"stopped by signal {self._stop_signal} at step {self.state.step}; "
                               f"checkpoint {last_ckpt}. Run the same command to resume.")
            summary = self.summary(last_ckpt, stopped=True, final_loss=last_loss)
            self.callbacks.on_train_end(self, summary)
            return summary
        last_ckpt = self.save()
        export = self.export()
        # always evaluate at the end, unless the periodic evaluation just did at this very step
        just_done = eval_every and self.state.step % eval_every == 0 and self._last_results is not None
        results = self._last_results if just_done else (self.run_evaluation() if self.data.eval is not None else None)
        summary = self.summary(last_ckpt, final_loss=last_loss, export=export, eval=results)
        self.callbacks.on_train_end(self, summary)
        if self.is_main and self.data.report is not None and self.data.report.total:
            logger.warning(f"skipped records in this run: {self.data.report.format()}")
        return summary

    # ---------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        state = {**asdict(self.state), "config": self.engine_config.to_dict(), "world_size": self.dist.world_size}
        path = self.checkpointer.save(step=self.state.step, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, trainer_state=state, dist=self.dist)
        self.callbacks.on_save(self, str(path))
        return path

    def export(self) -> Path | None:
        if not self.checkpointer.config.export_final:
            return None
        full = self.dist.full_state_dict(self.model)
        out = self.output_dir / "final"
        if self.is_main:
            tmp = self.output_dir / ".tmp-final"
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            module = self.dist.unwrap(self.model).model
            if full is not None:
                full = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            self.model_factory.export(self.bundle, module, tmp, state_dict=full)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        self.dist.barrier()
        return out

    def summary(self, checkpoint: Path | None, **extra: Any) -> dict[str, Any]:
        out = {"steps": self.state.step, "epoch": self.state.epoch, "output_dir": str(self.output_dir),
               "checkpoint": str(checkpoint) if checkpoint else None,
               "skipped_records": self.data.report.by_reason() if self.data.report is not None else {}}
        out.update(extra)
        if isinstance(out.get("export"), Path):
            out["export"] = str(out["export"])
        return out

    # ----------------------------------------------------------------------------------------- evaluation
    def run_evaluation(self) -> dict[str, Any]:
        from arctic_vl.trainers.evaluate import evaluate

        module = self.dist.unwrap(self.model).model if hasattr(self, "model") else self.bundle.model
        results = evaluate(self, module)
        if self.is_main:
            with open(self.output_dir / "eval.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.state.step, **results}) + "\n")
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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            changes.append((key, a.get(key, "<unset>"), b.get(key, "<unset>")))
    return changes


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep lines of steps <= `step` (a resumed run rewrites the steps after its checkpoint exactly once)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    tmp.replace(path)

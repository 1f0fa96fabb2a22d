"""Engine: builds each component from the config through its registry, then trains or evaluates."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from arctic_vl.checkpoint.checkpointer import RunWeights, load_trainable_weights, newest_weights
from arctic_vl.checkpoint.files import write_run_file
from arctic_vl.checkpoint.lock import LOCK_FILE, RunLock
from arctic_vl.config.run_files import refuse_link, run_directory
from arctic_vl.config.schema import EngineConfig, load_config, where
from arctic_vl.plugins import load_plugins, plugin_summary
from arctic_vl.registry import (
    CALLBACKS,
    CHECKPOINTERS,
    DATA,
    DISTRIBUTED,
    MODELS,
    OPTIMIZERS,
    SCHEDULERS,
    TRAINERS,
)


class Engine:
    """`Engine(config).train()`: config is a YAML path, a dict, or an EngineConfig."""

    def __init__(self, config: str | os.PathLike[str] | dict[str, Any] | EngineConfig,
                 overrides: list[str] | tuple[str, ...] = ()):
        load_plugins()
        self.config = load_config(config, overrides)
        self.output_dir = Path(self.config.trainer.output_dir)
        self._lock: RunLock | None = None

    # ----------------------------------------------------------------------------------------- building
    def model_factory(self) -> Any:
        """The run's model factory (nothing is loaded until its `build`)."""
        return MODELS.get(self.config.model.type)(self.config.model, self.config)

    def data_factory(self) -> Any:
        """The run's data factory (nothing is read until its `build`)."""
        return DATA.get(self.config.data.type)(self.config.data, self.config)

    def describe_model(self) -> str:
        """The model type, read from config files only (what `validate` prints)."""
        return self.model_factory().describe()

    def checkpointer(self) -> Any:
        """The run's checkpointer on OUTPUT_DIR/checkpoints (nothing is read until it is asked)."""
        return CHECKPOINTERS.get(self.config.checkpoint.type)(self.config.checkpoint, self.output_dir)

    def newest_weights(self) -> RunWeights:
        """The newest verified weights of this run (`arctic_vl.newest_weights` on OUTPUT_DIR with the run's
        checkpointer): final/ when it holds the last step, else the latest checkpoint; none is exit 2."""
        return newest_weights(self.output_dir, self.checkpointer())

    def build_model(self, weights: RunWeights | None, device: Any = None) -> Any:
        """The run's ModelBundle holding `weights` (from `newest_weights()`), as the verbs that read a run load it:
        a final/ export through the model factory's `build(path=final)`; a checkpoint as training rebuilds the
        model (the configured base model, freezing, LoRA) with the checkpoint's trainable weights loaded;
        None: the configured base model, untrained (an explicit choice, e.g. `evaluate --base`)."""
        factory = self.model_factory()
        factory.prepare(self.output_dir, self.config.trainer.seed)  # e.g. an inline tiny base model, if gone
        _seed_everything(self.config.trainer.seed)
        return _build_bundle(factory, weights, device, self.output_dir)

    def _build(self, weights: RunWeights | None = None) -> Any:
        """Every component from its registry, the trainer last with the others passed in; the model holds
        `weights` (see `build_model`) when given, else it is built for training."""
        c = self.config
        _quiet_transformers()
        dist = DISTRIBUTED.get(c.distributed.type)(c.distributed, c)
        dist.setup()
        seed = c.trainer.seed
        model_factory = self.model_factory()
        if dist.is_main:
            run_directory(self.output_dir, where(c, ("trainer", "output_dir")))
            # the run directory is this run's until it ends: before anything is written into it
            if self._lock is None:  # (a second build of the same Engine keeps its lock)
                self._lock = RunLock.acquire(self.output_dir, where(c, ("trainer", "output_dir")))
            check_run_dir(self.output_dir)
            model_factory.prepare(self.output_dir, seed)
        dist.barrier()
        _seed_everything(seed)
        bundle = _build_bundle(model_factory, weights, dist.device, self.output_dir)
        data = self.data_factory().build(bundle, seed=seed)
        callbacks = [CALLBACKS.get(cb.type)(cb) for cb in c.callbacks]
        if not any(cb.type == "progress" for cb in c.callbacks):
            callbacks.insert(0, CALLBACKS.get("progress")(CALLBACKS.get("progress").config_class()))
        trainer_cls = TRAINERS.get(c.trainer.type)
        return trainer_cls(
            c.trainer,
            model_factory=model_factory, model_bundle=bundle, data_bundle=data,
            optimizer_factory=OPTIMIZERS.get(c.optimizer.type)(c.optimizer),
            scheduler_factory=SCHEDULERS.get(c.scheduler.type)(c.scheduler),
            checkpointer=CHECKPOINTERS.get(c.checkpoint.type)(c.checkpoint, self.output_dir),
            callbacks=callbacks, dist=dist, eval_config=c.eval, run_config=c.to_dict(),
        )

    # -------------------------------------------------------------------------------------------- running
    def train(self) -> dict[str, Any]:
        """Train (resuming from the latest checkpoint in the output dir); returns a summary dict:
        steps, final_loss, checkpoint, export (the `final/` HF directory), skipped_records.

        The main process holds OUTPUT_DIR/.lock from the start of the build to the end: a second run on the same
        directory stops with exit code 2, naming this one."""
        try:
            trainer = self._build()
            if trainer.is_main:
                self._write_run_files(trainer)
            try:
                summary = trainer.train()
            except BaseException:
                trainer.dist.teardown()
                raise
            trainer.dist.teardown(clean=True)
            if trainer.is_main:
                write_run_file(self.output_dir / "summary.json", json.dumps(summary, indent=1, default=str))
            return summary
        finally:
            self.release_lock()

    def release_lock(self) -> None:
        """Give back OUTPUT_DIR/.lock (taken by the build on the main process); harmless when not held."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def evaluate(self, *, base: bool = False) -> dict[str, Any]:
        """Eval loss (and exact match with `eval.generate`) on `data.eval_sources`, of the run's newest weights
        (`newest_weights()`: final/ when it holds the last step, else the latest checkpoint); with `base`, of the
        configured base model, untrained (step 0). A run without weights is a ConfigError (exit 2).

        Recorded in OUTPUT_DIR/eval_standalone.jsonl at the step of the weights evaluated (never in the
        training-time eval.jsonl); the callbacks see it as a standalone evaluation. The results carry `model`
        (the path evaluated, or the base model's description), `step` and `weights` (final|checkpoint|base)."""
        from arctic_vl.errors import ConfigError

        if not base:
            try:
                weights: RunWeights | None = self.newest_weights()
            except ConfigError as e:
                raise ConfigError(f"evaluate: {e}; or pass --base to evaluate the untrained base model") from None
        else:
            weights = None
            if int(os.environ.get("RANK", "0") or 0) == 0:
                from loguru import logger

                logger.info(f"weights: the base model ({self.describe_model()}), untrained: step 0 (--base)")
        try:
            trainer = self._build(weights)
            try:
                if trainer.data.eval is None:
                    raise ConfigError("evaluate: data.eval_sources is empty; name the held-out data files there")
                results = trainer.evaluate_standalone(weights.step if weights is not None else 0)
            except BaseException:
                trainer.dist.teardown()
                raise
            trainer.dist.teardown(clean=True)
        finally:
            self.release_lock()
        results["model"] = str(weights.path) if weights is not None else self.describe_model()
        results["step"] = trainer.state.step
        results["weights"] = weights.kind if weights is not None else "base"
        return results

    def _write_run_files(self, trainer: Any) -> None:
        write_run_file(self.output_dir / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        info = {"versions": package_versions(), "git_commit": git_commit(), "python": platform.python_version(),
                "config_source": self.config.source, "world_size": trainer.dist.world_size,
                "data": trainer.data.stats, "parameters": trainer.bundle.parameter_counts()}
        info["plugins"] = plugin_summary()
        write_run_file(self.output_dir / "run_info.json", json.dumps(info, indent=1, default=str))


def _build_bundle(factory: Any, weights: RunWeights | None, device: Any, output_dir: Path) -> Any:
    """`factory.build` holding `weights`: final/ loaded as saved, a checkpoint's trainable weights on the
    rebuilt model, or (None) the model as configured."""
    if weights is not None and weights.kind == "final":
        return factory.build(device=device, output_dir=output_dir, path=weights.path)
    bundle = factory.build(device=device, output_dir=output_dir)
    if weights is not None:
        load_trainable_weights(bundle.model, weights.path)
    return bundle


def run_dir_entries() -> tuple[str, ...]:
    """The names the engine writes directly under OUTPUT_DIR (files and folders, temporary names included)."""
    from arctic_vl.callbacks.trackers import TRACKERS_FILE
    from arctic_vl.trainers.base import EVAL_FILE, STANDALONE_EVAL_FILE

    files = ("metrics.jsonl", EVAL_FILE, STANDALONE_EVAL_FILE, "config.yaml", "run_info.json", "summary.json",
             TRACKERS_FILE)
    return (LOCK_FILE, *files, *(f".{name}.tmp" for name in files), "checkpoints", "final", ".tmp-final", "base_model")


def check_run_dir(output_dir: Path) -> None:
    """Before a run writes anything: a symbolic link at any path it writes under OUTPUT_DIR is a ConfigError (exit
    2) naming it (see `arctic_vl.config.run_files`); each write checks again when it happens."""
    for name in run_dir_entries():
        refuse_link(output_dir / name)
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir():
        for entry in sorted(checkpoints.iterdir()):
            if entry.name.startswith(".tmp-step-"):
                refuse_link(entry)


def _quiet_transformers() -> None:
    """Our progress bar and logs are the run's; transformers' per-load bars only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def package_versions() -> dict[str, str | None]:
    """Installed versions of arctic-vl and the libraries a run depends on (None for a missing one)."""
    out: dict[str, str | None] = {}
    for name in ("arctic-vl", "torch", "transformers", "peft", "deepspeed", "datasets", "pydantic", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The commit of the arctic_vl checkout, when it is one."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

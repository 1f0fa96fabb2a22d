"""Resumable checkpoints, written atomically, and the final HF export.

`OUTPUT_DIR/checkpoints/step-N/` holds: `model.safetensors` (the trainable weights: everything frozen
is rebuilt exactly by the model factory), `optimizer.pt` and `scheduler.pt` (plain tensors and numbers,
loaded with `weights_only=True`), `rng-rank{R}.pt`, and `trainer_state.json` (step, epoch, position in
the epoch, the resolved config). A checkpoint is written into a temporary folder and renamed into place,
so a kill during the write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from arctic_vl.errors import ConfigError, DataError
from arctic_vl.registry import CHECKPOINTERS, Component, ComponentConfig

STATE_FILE = "trainer_state.json"


class CheckpointConfig(ComponentConfig):
    type: str = "default"
    every_n_steps: int | None = Field(None, ge=1, description="save every N optimizer steps (also on SIGTERM and at the end)")
    keep_last: int | None = Field(2, ge=1, description="keep the newest N checkpoints (None keeps all)")
    save_on_sigterm: bool = True
    export_final: bool = Field(True, description="write OUTPUT_DIR/final (save_pretrained, safetensors, processor)")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain data (safe to load with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@CHECKPOINTERS.register("default")
class Checkpointer(Component):
    """Saves and finds resumable checkpoints under OUTPUT_DIR/checkpoints (the base of `CHECKPOINTERS`).

    The loop calls `latest()` (the newest complete checkpoint or None), `read_state(path)` (its
    trainer_state.json), `load(path, model=, optimizer=, scheduler=, dist=)` and `save(step=, model=,
    optimizer=, scheduler=, trainer_state=, dist=)` on every rank; `save` writes atomically.
    """

    config_class = CheckpointConfig

    def __init__(self, config: CheckpointConfig, output_dir: Path):
        self.config = config
        self.dir = output_dir / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).is_file():
                found.append(p)
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def read_state(self, path: Path) -> dict[str, Any]:
        return json.loads((path / STATE_FILE).read_text())

    def save(self, *, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, trainer_state: dict[str, Any],
             dist: Any) -> Path:
        """Write step-N atomically. Every rank calls this (each saves its RNG; DeepSpeed its shards)."""
        final = self.dir / f"step-{step}"
        tmp = self.dir / f".tmp-step-{step}"
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save(rng_state(), tmp / f"rng-rank{dist.rank}.pt")
        engine_saved = dist.save_state(model, optimizer, str(tmp))
        if dist.is_main:
            if not engine_saved:
                save_file(trainable_state(dist.unwrap(model)), str(tmp / "model.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        dist.barrier()
        if dist.is_main:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            self.prune()
        dist.barrier()
        return final

    def prune(self) -> None:
        """Drop old checkpoints beyond keep_last, and leftovers of interrupted writes."""
        for leftover in self.dir.glob(".tmp-step-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self.config.keep_last is None:
            return
        for old in self.checkpoints()[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, dist: Any) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler and this rank's RNG; returns the trainer state."""
        if not dist.load_state(model, optimizer, str(path)):
            weights = load_file(str(path / "model.safetensors"))
            module = dist.unwrap(model)
            missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in weights]
            if missing:
                raise RuntimeError(f"{path}: checkpoint lacks trainable weights {missing[:5]}; was the model changed?")
            module.load_state_dict(weights, strict=False)
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_file = path / f"rng-rank{dist.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return self.read_state(path)


CHECKPOINTERS.bind_base(Checkpointer)


#: `_StepModule` holds the model as `.model`: checkpoint names start with this
STEP_MODULE_PREFIX = "model."


def find_checkpoint(run_dir: Path, checkpointer: Any, checkpoint: str | None) -> Path:
    """`checkpoint` (a path, or a name under RUN_DIR/checkpoints such as `step-6`), else the latest one."""
    if checkpoint is None:
        latest = checkpointer.latest()
        if latest is None:
            raise ConfigError(f"{run_dir}: no complete checkpoint under {checkpointer.dir}")
        return latest
    path = Path(checkpoint)
    if not path.is_dir():
        path = checkpointer.dir / checkpoint
    if not (path / "trainer_state.json").is_file():
        names = ", ".join(p.name for p in checkpointer.checkpoints()) or "(none)"
        raise ConfigError(f"checkpoint {checkpoint!r} is not a complete checkpoint of {run_dir}; available: {names}")
    return path


def load_trainable_weights(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """Load `checkpoint/model.safetensors` (the trainable weights, named as the loop's `_StepModule`) into
    `model`; returns the names loaded. Names the model lacks, or shapes that differ, are an error."""
    file = checkpoint / "model.safetensors"
    if not file.is_file():
        raise DataError(
            f"{checkpoint}: no model.safetensors (a DeepSpeed checkpoint keeps sharded engine state); "
            "export from the run's final/ instead, or use the single/ddp backends"
        )
    weights = {k.removeprefix(STEP_MODULE_PREFIX): v for k, v in load_file(str(file)).items()}
    own = model.state_dict()
    unknown = [k for k in weights if k not in own]
    if unknown:
        raise DataError(f"{file}: {len(unknown)} weights the rebuilt model does not have, e.g. {unknown[:3]}; "
                        "was RUN_DIR/config.yaml changed after training?")
    bad_shape = [k for k, v in weights.items() if tuple(own[k].shape) != tuple(v.shape)]
    if bad_shape:
        k = bad_shape[0]
        raise DataError(f"{file}: {k} has shape {tuple(weights[k].shape)}, the model {tuple(own[k].shape)}")
    model.load_state_dict(weights, strict=False)
    return sorted(weights)

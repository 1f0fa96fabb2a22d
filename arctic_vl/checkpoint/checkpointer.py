"""Resumable checkpoints, written atomically and verified on resume, and the final HF export.

`OUTPUT_DIR/checkpoints/step-N/` holds: `model.safetensors` (the trainable weights: everything frozen
is rebuilt exactly by the model factory), `optimizer.pt` and `scheduler.pt` (plain tensors and numbers,
loaded with `weights_only=True`), `rng-rank{R}.pt`, `trainer_state.json` (step, epoch, position in the
epoch, the resolved config) and, written last, `manifest.json` (size and SHA-256 of every file). A
checkpoint is written into a temporary folder and renamed into place, so a kill during the write leaves
the previous checkpoint as the latest.

`latest()` returns the newest checkpoint that verifies against its manifest; each newer one that does not
(a flipped byte, a truncated, missing, added or unreadable file) is reported by name and skipped, and
when none verifies the run stops with a CheckpointError (exit 1) naming every failure. Every write and read
names its file and why it failed; a full disk says so, with the bytes needed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from loguru import logger
from pydantic import Field

from arctic_vl.checkpoint.files import (
    fsync_dir,
    fsync_file,
    load_json,
    load_tensors,
    load_torch,
    save_json,
    save_tensors,
    save_torch,
    write_error,
)
from arctic_vl.checkpoint.manifest import CHECKPOINT_FORMAT, MANIFEST, build_manifest, verify
from arctic_vl.config.run_files import fresh_dir, make_dir, refuse_link, remove_tree
from arctic_vl.errors import CheckpointError, ConfigError, DataError
from arctic_vl.registry import CHECKPOINTERS, Component, ComponentConfig

STATE_FILE = "trainer_state.json"
#: written into every HF export (the run's final/, `arctic_vl export`'s OUT): the step, epoch and source
#: checkpoint of the weights it holds
EXPORT_INFO_FILE = "export_info.json"


class CheckpointConfig(ComponentConfig):
    """The `checkpoint:` section: how often step-N checkpoints are saved, how many are kept, the final export."""

    type: str = "default"
    every_n_steps: int | None = Field(
        None, ge=1, description="save every N optimizer steps (also on SIGTERM and at the end)"
    )
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
    """Restore the Python, numpy, torch (and CUDA, when saved and present) RNG states that `rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, detached contiguous CPU copies by name (what a checkpoint saves)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _is_main_process() -> bool:
    # `latest()` runs on every rank (each must pick the same checkpoint); one of them reports
    return int(os.environ.get("RANK", "0") or 0) == 0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@CHECKPOINTERS.register("default")
class Checkpointer(Component):
    """Saves, verifies and finds resumable checkpoints under OUTPUT_DIR/checkpoints (the base of `CHECKPOINTERS`).

    The loop calls `latest()` (the newest checkpoint that verifies, or None), `read_state(path)` (its
    trainer_state.json), `load(path, model=, optimizer=, scheduler=, dist=)` and `save(step=, model=,
    optimizer=, scheduler=, trainer_state=, dist=)` on every rank; `save` writes atomically, manifest last.
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
        try:
            for p in self.dir.iterdir():
                if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).is_file():
                    found.append(p)
        except OSError as e:
            raise CheckpointError(f"{self.dir}: cannot list the checkpoints: {e.strerror}") from None
        return sorted(found, key=lambda p: int(p.name[5:]))

    def verify(self, path: Path) -> list[str]:
        """What is wrong with the checkpoint at `path` (empty: it is exactly what was written)."""
        try:
            state = load_json(path / STATE_FILE)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path / STATE_FILE}: not a JSON object")
        except CheckpointError as e:
            state, problems = None, [f"{STATE_FILE}: {str(e).split(': ', 1)[-1]}"]
        else:
            bad = [k for k in ("step", "epoch", "batch_in_epoch")
                   if not (isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0)]
            problems = [f"{STATE_FILE}: {k} is {state.get(k, 'missing')!r}, not a count" for k in bad]
            if not bad and path.name != f"step-{state['step']}":
                problems.append(f"{STATE_FILE}: step is {state['step']}, but the folder is {path.name}")
        found, has_manifest = verify(path, state)
        if not has_manifest:
            found = _missing_parts(path) + found
        if state is not None and not problems and not found and not has_manifest and _is_main_process():
            logger.warning(f"{path}: written before checkpoints carried a manifest: checked for truncation and "
                           "zip CRCs only")
        return problems + found

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies (None if there is none). Newer ones that fail are reported by name
        and skipped; if every checkpoint fails, a CheckpointError names each one's failures."""
        failed: list[tuple[Path, list[str]]] = []
        for path in reversed(self.checkpoints()):
            problems = self.verify(path)
            if not problems:
                if failed and _is_main_process():
                    logger.warning(f"falling back to {path.name}, the newest checkpoint that verifies "
                                   f"(skipped: {', '.join(p.name for p, _ in failed)})")
                return path
            failed.append((path, problems))
            if _is_main_process():
                logger.warning(f"{path}: checkpoint fails verification, not resuming from it: {'; '.join(problems)}")
        if failed:
            detail = "\n  ".join(f"{p}: {'; '.join(probs)}" for p, probs in failed)
            raise CheckpointError(
                f"{self.dir}: no checkpoint verifies, so the run cannot resume:\n  {detail}\n"
                "Restore the files from a copy, or move the checkpoints away to start over"
            )
        return None

    def read_state(self, path: Path) -> dict[str, Any]:
        """The checkpoint's trainer state (its STATE_FILE); CheckpointError if that is not a JSON object."""
        state = load_json(path / STATE_FILE)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path / STATE_FILE}: not a JSON object")
        return state

    def save(self, *, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any, trainer_state: dict[str, Any],
             dist: Any) -> Path:
        """Write step-N atomically. Every rank calls this (each saves its RNG; DeepSpeed its shards)."""
        final = self.dir / f"step-{step}"
        tmp = self.dir / f".tmp-step-{step}"
        needed = self._estimate_bytes(dist.unwrap(model))
        try:
            if dist.is_main:
                # never through a link planted at checkpoints/, .tmp-step-N or step-N (ConfigError naming it)
                make_dir(self.dir)
                refuse_link(final)
                try:
                    fresh_dir(tmp)
                except OSError as e:
                    raise write_error(tmp, e, needed) from None
            dist.barrier()
            save_torch(rng_state(), tmp / f"rng-rank{dist.rank}.pt", needed)
            try:
                engine_saved = dist.save_state(model, optimizer, str(tmp))
            except (OSError, RuntimeError) as e:  # an engine's own shard (its `filename` when it says)
                raise write_error(Path(getattr(e, "filename", None) or tmp), e, needed) from None
            if dist.is_main:
                if not engine_saved:
                    save_tensors(trainable_state(dist.unwrap(model)), tmp / "model.safetensors", needed)
                    save_torch(optimizer.state_dict(), tmp / "optimizer.pt", needed)
                save_torch(scheduler.state_dict(), tmp / "scheduler.pt", needed)
                save_json({**trainer_state, "checkpoint_format": CHECKPOINT_FORMAT}, tmp / STATE_FILE, needed)
            dist.barrier()
            if dist.is_main:
                for f in tmp.rglob("*"):
                    if f.is_file():
                        fsync_file(f, needed)
                # the manifest is the last file: a checkpoint with one was complete when it was written
                save_json(build_manifest(tmp), tmp / MANIFEST, needed)
                fsync_file(tmp / MANIFEST, needed)
                fsync_dir(tmp)
                remove_tree(final)  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
                os.replace(tmp, final)
                fsync_dir(self.dir)
                self.prune()
        except CheckpointError:
            if dist.is_main:  # the partial write would only take the room the next attempt needs
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        dist.barrier()
        return final

    def _estimate_bytes(self, module: torch.nn.Module) -> int:
        """Bytes a checkpoint takes: the previous one's size, else the trainable weights plus Adam's two moments."""
        previous = self.checkpoints()
        if previous:
            try:
                return _dir_bytes(previous[-1])
            except OSError:
                pass
        params = [p for p in module.parameters() if p.requires_grad]
        return 3 * sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in params)

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
            weights = load_tensors(path / "model.safetensors")
            module = dist.unwrap(model)
            missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in weights]
            if missing:
                raise CheckpointError(f"{path / 'model.safetensors'}: lacks trainable weights {missing[:5]}; "
                                      "was the model changed?")
            module.load_state_dict(weights, strict=False)
            state = load_torch(path / "optimizer.pt")
            try:
                optimizer.load_state_dict(state)
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{path / 'optimizer.pt'}: does not fit this run's optimizer: {e}") from None
        try:
            scheduler.load_state_dict(load_torch(path / "scheduler.pt"))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'scheduler.pt'}: does not fit this run's scheduler: {e}") from None
        rng_file = path / f"rng-rank{dist.rank}.pt"
        if rng_file.is_file():
            try:
                set_rng_state(load_torch(rng_file))
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{rng_file}: not an RNG state: {e}") from None
        return self.read_state(path)


CHECKPOINTERS.bind_base(Checkpointer)


def _missing_parts(path: Path) -> list[str]:
    """What a checkpoint without a manifest lacks of the files every checkpoint has: scheduler.pt, and the weights
    (model.safetensors with optimizer.pt, or an engine's shard folder). A stray `step-N/` holding only a
    trainer_state.json is then incomplete, by name, instead of a checkpoint whose settings all differ."""
    missing = [name for name in ("scheduler.pt",) if not (path / name).is_file()]
    engine_shards = any(p.is_dir() for p in path.iterdir())
    if not engine_shards:
        missing += [name for name in ("model.safetensors", "optimizer.pt") if not (path / name).is_file()]
    if not missing:
        return []
    return [f"incomplete: no {MANIFEST} and no {', '.join(missing)} (a write cut short, or not a checkpoint this "
            "engine wrote)"]


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
    problems = checkpointer.verify(path) if hasattr(checkpointer, "verify") else []
    if problems:
        raise CheckpointError(f"{path}: checkpoint fails verification: {'; '.join(problems)}")
    return path


@dataclass(frozen=True)
class RunWeights:
    """The weights a verb reads from a run (`newest_weights`): `path` (RUN_DIR/final or a checkpoint's
    folder), `step` and `epoch` of those weights, and `kind`: "final" (an HF export, loaded as saved) or
    "checkpoint" (the trainable weights: rebuild the base model as training does, then load them)."""

    path: Path
    step: int
    kind: Literal["final", "checkpoint"]
    epoch: int | None = None

    def describe(self) -> str:
        """`checkpoint RUN/checkpoints/step-10 (step 10)`: what a verb prints before it starts."""
        return f"{self.kind} {self.path} (step {self.step})"


def _final_info(final: Path) -> dict[str, Any] | None:
    """final/'s export info ({} for an export from before it carried one); None when there is no complete export."""
    if not (final / "config.json").is_file():  # written atomically: no config.json, no export
        return None
    info_file = final / EXPORT_INFO_FILE
    if not info_file.is_file():
        return {}
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        step = info["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step is {step!r}, not a count")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{info_file}: unreadable export info ({type(e).__name__}: {e}); "
                              "the step of final/'s weights is unknown") from None
    return info


def newest_weights(run_dir: str | Path, checkpointer: Any = None) -> RunWeights:
    """The newest verified weights of the run in `run_dir`, the rule every verb that reads a run follows.

    `final/` when it holds the last step (its export_info.json step is not older than the newest checkpoint
    that verifies, or there is no checkpoint); otherwise that checkpoint (a run killed or stopped before its
    end, or resumed past an older export). `checkpointer`: the run's (its `latest()` and `read_state()`);
    default: the core's on RUN_DIR/checkpoints. No weights at all is a ConfigError (exit 2) naming the run
    directory: a base model is never a silent fallback. Logged (main process) as `RunWeights.describe()`.
    """
    run_dir = Path(run_dir)
    ck = checkpointer if checkpointer is not None else Checkpointer(CheckpointConfig(), run_dir)
    final = run_dir / "final"
    info = _final_info(final)
    try:
        latest = ck.latest()
    except CheckpointError:
        # no checkpoint verifies: final/ is still the newest verified weights when no checkpoint is newer
        newest = max((int(p.name[5:]) for p in ck.checkpoints()), default=-1)
        if not info or info["step"] < newest:
            raise
        latest = None
    state = ck.read_state(latest) if latest is not None else None
    why = ""
    if info is not None:
        step = info.get("step")
        if step is None and state is not None:
            # an export from before export info existed: written right after its run's last checkpoint, so a
            # checkpoint written after it is newer weights
            newer = (latest / STATE_FILE).stat().st_mtime > (final / "config.json").stat().st_mtime  # type: ignore[operator]
            step = None if newer else int(state["step"])
        elif step is None:
            step = 0
            _warn(f"{final}: no {EXPORT_INFO_FILE} and no checkpoint: the step of its weights is unknown, taken as 0")
        if step is not None and (state is None or step >= int(state["step"])):
            epoch = info.get("epoch", state.get("epoch") if state is not None else None)
            return _chosen(RunWeights(final, int(step), "final", epoch), run_dir, "")
        why = (f"; final/ is older (step {info['step']})" if info.get("step") is not None
               else "; final/ is older (written before it)")
    if state is None:
        raise ConfigError(f"{run_dir}: no trained weights: no final/ export and no complete checkpoint under "
                          f"{run_dir / 'checkpoints'}; train the run first")
    assert latest is not None
    return _chosen(RunWeights(latest, int(state["step"]), "checkpoint", state.get("epoch")), run_dir, why)


def _warn(message: str) -> None:
    if _is_main_process():
        logger.warning(message)


def _chosen(weights: RunWeights, run_dir: Path, why: str) -> RunWeights:
    if _is_main_process():
        logger.info(f"weights: {weights.describe()}, the newest of run {run_dir}{why}")
    return weights


def load_trainable_weights(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """Load `checkpoint/model.safetensors` (the trainable weights, named as the loop's `_StepModule`) into
    `model`; returns the names loaded. Names the model lacks, or shapes that differ, are an error."""
    file = checkpoint / "model.safetensors"
    if not file.is_file():
        raise DataError(
            f"{checkpoint}: no model.safetensors (a DeepSpeed checkpoint keeps sharded engine state), so the model "
            "cannot be rebuilt from it here; rerun the training command to let the run finish and write final/, "
            "or train with the single/ddp backends"
        )
    weights = {k.removeprefix(STEP_MODULE_PREFIX): v for k, v in load_tensors(file).items()}
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

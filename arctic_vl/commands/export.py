"""`arctic_vl export RUN_DIR --out OUT [--merge-lora] [--checkpoint step-N]`: an HF directory of a run's weights.

By default the run's newest weights (`arctic_vl.newest_weights`): its `final/` when that holds the last step
(copied as it is), else the latest checkpoint (a run killed or stopped before its end). From a checkpoint the
model is rebuilt exactly as the run built it (RUN_DIR/config.yaml through the engine's model factory: base
weights, freezing, LoRA), the checkpoint's trainable weights are loaded into it, and the factory exports it:
for a LoRA run the merged full model in OUT and the PEFT adapter in OUT/adapter, the same layout as the run's
own `final/`. Every trained non-LoRA weight (a fully trained vision tower or aligner, modules_to_save, loose
parameters) comes from the checkpoint as it was trained. OUT/export_info.json names the step, the epoch and
the source checkpoint. `--merge-lora` is accepted for LoRA runs (they are always exported merged) and is not
needed otherwise; `--merge-lora OUT` (the older form) still names the output directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from arctic_vl.checkpoint.checkpointer import (
    EXPORT_INFO_FILE,
    RunWeights,
    find_checkpoint,
    load_trainable_weights,
    newest_weights,
)
from arctic_vl.config.schema import load_config
from arctic_vl.engine import Engine
from arctic_vl.errors import ConfigError
from arctic_vl.registry import CHECKPOINTERS


def _check_target(out: Path, run_dir: Path) -> None:
    """Refuse, before anything is built, an OUT that is a file or would overwrite (part of) the run."""
    target = out.resolve()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if target == run_dir or target in run_dir.parents:
        raise ConfigError(f"export target {out} would overwrite the run directory {run_dir}")
    for part in ("final", "checkpoints", "base_model"):
        if target == run_dir / part or (run_dir / part) in target.parents:
            raise ConfigError(f"export target {out} is inside the run's {part}/ ({run_dir / part}); choose another")


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None, *,
               merge_lora: bool = False) -> Path:
    """Export the run's newest weights (or `checkpoint`, a name such as `step-6` or a path) to `out_dir`: final/
    copied, or the model rebuilt with a checkpoint's trainable weights and exported (merged for LoRA); writes
    OUT/export_info.json. Which weights is logged (stderr) before it starts."""
    run_dir = Path(run_dir).resolve()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a run directory written by `arctic_vl train`)")
    out = Path(out_dir)
    _check_target(out, run_dir)
    engine = Engine(load_config(config_file, writable_output=False))  # export reads the run; writes OUT
    c = engine.config
    if merge_lora and getattr(c.model, "lora", None) is None:
        print(f"export: {run_dir} trained no LoRA adapters (model.lora is not set): --merge-lora has nothing to "
              "merge; the full model is exported as trained", file=sys.stderr)
    checkpointer = CHECKPOINTERS.get(c.checkpoint.type)(c.checkpoint, run_dir)
    if checkpoint is None:
        weights = newest_weights(run_dir, checkpointer)
    else:
        path = find_checkpoint(run_dir, checkpointer, checkpoint)
        state = checkpointer.read_state(path)
        weights = RunWeights(path, int(state["step"]), "checkpoint", state.get("epoch"))
        print(f"export: weights: {weights.describe()} (--checkpoint)", file=sys.stderr)
    if weights.kind == "final":  # already the HF export of these weights (the same a rebuild would write)
        shutil.copytree(weights.path, out, dirs_exist_ok=True)
        source = json.loads((weights.path / EXPORT_INFO_FILE).read_text()).get("checkpoint") \
            if (weights.path / EXPORT_INFO_FILE).is_file() else None
    else:
        factory = engine.model_factory()
        factory.prepare(run_dir, c.trainer.seed)  # e.g. an inline tiny model, rebuilt (deterministically) if gone
        bundle = factory.build(device=torch.device("cpu"), output_dir=run_dir)
        load_trainable_weights(bundle.model, weights.path)
        factory.export(bundle, bundle.model, out)
        source = weights.path.name if weights.path.parent == checkpointer.dir else str(weights.path)
    info = {"step": weights.step, "epoch": weights.epoch, "checkpoint": source, "source": str(weights.path),
            "run_dir": str(run_dir)}
    (out / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=1))
    return out


def main(argv: list[str]) -> int:
    """`arctic_vl export RUN_DIR --out OUT [--merge-lora] [--checkpoint step-N]`; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="arctic_vl export",
        description="Write an HF model directory of a run's newest weights (LoRA merged; adapter in OUT/adapter).",
    )
    p.add_argument("run_dir", help="the run's output directory (holds config.yaml, final/ and checkpoints/)")
    p.add_argument("--out", default=None, metavar="OUT",
                   help="output directory: the full model (any LoRA merged in; plain transformers loads it)")
    p.add_argument("--merge-lora", nargs="?", const=True, default=False, metavar="OUT",
                   help="merge the LoRA adapters into the full model (what a LoRA run's export always does; the "
                        "adapter also goes to OUT/adapter); `--merge-lora OUT` is the older form of --out OUT")
    p.add_argument("--checkpoint", default=None, help="a checkpoint name (step-N) or path; default: the newest weights")
    args = p.parse_args(argv)
    out = args.out
    if isinstance(args.merge_lora, str):
        if out is not None and Path(out) != Path(args.merge_lora):
            p.error(f"--merge-lora {args.merge_lora} and --out {out} name two output directories; give one")
        out = args.merge_lora
    if out is None:
        p.error("give the output directory: --out OUT")
    written = export_run(args.run_dir, out, args.checkpoint, merge_lora=args.merge_lora is not False)
    print(f"exported {args.run_dir} to {written}")
    return 0

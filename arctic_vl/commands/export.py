"""`arctic_vl export RUN_DIR --merge-lora OUT`: an HF directory from a run's checkpoint.

The model is rebuilt exactly as the run built it (RUN_DIR/config.yaml through the engine's model
factory: base weights, freezing, LoRA), the checkpoint's trainable weights are loaded into it, and the
factory exports it: for a LoRA run the merged full model in OUT and the PEFT adapter in OUT/adapter,
the same layout as the run's own `final/`. Every trained non-LoRA weight (a fully trained vision tower
or aligner, modules_to_save, loose parameters) comes from the checkpoint as it was trained.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from arctic_vl.checkpoint.checkpointer import find_checkpoint, load_trainable_weights
from arctic_vl.config.schema import load_config
from arctic_vl.engine import Engine
from arctic_vl.errors import ConfigError
from arctic_vl.registry import CHECKPOINTERS


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None) -> Path:
    """Rebuild the run's model, load a checkpoint's trainable weights, export to `out_dir` (merged for LoRA)."""
    run_dir = Path(run_dir).resolve()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a run directory written by `arctic_vl train`)")
    engine = Engine(load_config(config_file, writable_output=False))  # export reads the run; writes OUT
    c = engine.config
    checkpointer = CHECKPOINTERS.get(c.checkpoint.type)(c.checkpoint, run_dir)
    ckpt = find_checkpoint(run_dir, checkpointer, checkpoint)
    factory = engine.model_factory()
    factory.prepare(run_dir, c.trainer.seed)  # e.g. an inline tiny model, rebuilt (deterministically) if gone
    bundle = factory.build(device=torch.device("cpu"), output_dir=run_dir)
    load_trainable_weights(bundle.model, ckpt)
    out = Path(out_dir)
    if out.resolve() == run_dir or out.resolve() in run_dir.parents:
        raise ConfigError(f"export target {out} would overwrite the run directory {run_dir}")
    factory.export(bundle, bundle.model, out)
    return out


def main(argv: list[str]) -> int:
    """`arctic_vl export RUN_DIR --merge-lora OUT [--checkpoint step-N]`; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="arctic_vl export",
        description="Write an HF model directory from a run's checkpoint (LoRA merged; adapter in OUT/adapter).",
    )
    p.add_argument("run_dir", help="the run's output directory (holds config.yaml and checkpoints/)")
    p.add_argument("--merge-lora", dest="out", required=True, metavar="OUT",
                   help="output directory: the full model with any LoRA merged in (plain transformers loads it)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint name (step-N) or path; default: the latest")
    args = p.parse_args(argv)
    out = export_run(args.run_dir, args.out, args.checkpoint)
    print(f"exported {args.run_dir} to {out}")
    return 0

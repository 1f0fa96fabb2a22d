"""The October origin YAML's augmentation block validates and trains; the save delay in epochs (`save_delay`'s
`epochs`, the origin's `save_delay_epochs`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from arctic_vl import ConfigError, load_config

CONFIG = Path(__file__).parent / "configs" / "origin-oct-augmentation.yaml"


def test_origin_october_augmentation_trains_and_delays_saves_by_epochs(shapes: Path, tmp_path: Path) -> None:
    """16 records in micro-batches of 4: 4 steps an epoch; a delay of 1.5 epochs is step 6, so of the periodic
    checkpoints (every 2 steps) steps 2 and 4 are skipped: step 6 and the end's step 8 are written."""
    from arctic_vl import Engine

    overrides = [f"data.sources=[{{path: {shapes / 'train.dense.jsonl'}, sample: 'first:16'}}]",
                 f"trainer.output_dir={tmp_path / 'run'}"]
    cfg = load_config(CONFIG, overrides)
    assert [op.name for op in cfg.data.augmentation.ops] == ["hflip", "rotate", "color_jitter", "pad_to_multiple"]
    assert cfg.data.augmentation.ops[2].parsed.brightness == (0.85, 1.15)
    Engine(CONFIG, overrides).train()
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6", "step-8"]
    summary = json.loads((run / "summary.json").read_text())
    aug = summary["augmentation"]
    assert aug["samples"] == 32 and {"hflip", "rotate", "color_jitter", "pad_to_multiple"} >= set(aug["ops"])
    assert aug["ops"]["pad_to_multiple"] == 32 and aug["ops"]["color_jitter"] > 0


def test_save_delay_epochs_converts_with_steps_per_epoch() -> None:
    from arctic_vl.callbacks.builtin import SaveDelay, SaveDelayConfig

    trainer = SimpleNamespace(steps_per_epoch=lambda: 7, save_not_before=0)
    SaveDelay(SaveDelayConfig(epochs=1.5)).on_train_start(trainer)
    assert trainer.save_not_before == 11  # ceil(1.5 x 7)
    SaveDelay(SaveDelayConfig(epochs=2)).on_train_start(trainer)
    assert trainer.save_not_before == 14
    SaveDelay(SaveDelayConfig(steps=5)).on_train_start(trainer)
    assert trainer.save_not_before == 5


def test_save_delay_needs_exactly_one_of_steps_and_epochs(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("")
    base = "model: {family: qwen2_vl}\ndata: {sources: [train.jsonl]}\ncallbacks:\n"
    for body in ("  - {type: save_delay, steps: 4, epochs: 1}\n", "  - {type: save_delay}\n"):
        (tmp_path / "run.yaml").write_text(base + body)
        with pytest.raises(ConfigError, match=r"run.yaml:4: callbacks\[0\].*give exactly one of steps .* or epochs"):
            load_config(tmp_path / "run.yaml")

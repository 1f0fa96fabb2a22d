"""The shipped recipes validate (with local paths swapped for tiny ones) and read like the runs they describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from arctic_vl import load_config

from .conftest import PROJECT, TINY

CONFIGS = PROJECT / "configs"


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from arctic_vl import make_tiny_model

    shape = {**TINY, "patch_size": 16}
    return make_tiny_model("qwen3_vl", tmp_path_factory.mktemp("tiny_q3"), seed=0, **shape)


def _overrides(model: Path, shapes: Path, out: Path) -> list[str]:
    return [f"model.name_or_path={model}", f"data.sources=[{shapes / 'train.dense.jsonl'}]",
            f"data.eval_sources=[{shapes / 'heldout.dense.jsonl'}]", f"trainer.output_dir={out}"]


@pytest.mark.parametrize("name", ["qwen3vl-stage1-aligner.yaml", "qwen3vl-stage2-llm-aligner-lora.yaml",
                                  "qwen3vl-stage2-gkd.yaml", "qwen2_5vl-full.yaml"])
def test_real_checkpoint_recipes_validate(name: str, tiny_qwen3: Path, tiny_qwen25: Path, shapes: Path,
                                          tmp_path: Path) -> None:
    model = tiny_qwen25 if name.startswith("qwen2_5") else tiny_qwen3
    cfg = load_config(CONFIGS / name, _overrides(model, shapes, tmp_path))
    assert cfg.data.type == "dense_caption" and cfg.data.augmentation.enabled
    if "stage1" in name:
        assert cfg.model.freeze == ["vision", "llm"] and cfg.model.lora is None
    if "stage2" in name:
        assert cfg.model.freeze == ["vision"] and cfg.model.lora.parts == ["llm", "aligner"]
    if "gkd" in name:
        assert cfg.trainer.type == "gkd" and cfg.trainer.teacher is None  # teacher: the student's base


def test_stage2_starts_from_stage1_and_gkd_teacher_defaults_to_it(tiny_qwen3: Path, shapes: Path,
                                                                  tmp_path: Path) -> None:
    """Stage 2 builds on stage 1's export (model.name_or_path): LoRA on llm + aligner, the GKD teacher is that
    export."""
    from arctic_vl import Engine

    overrides = [*_overrides(tiny_qwen3, shapes, tmp_path / "run"), "model.dtype=float32",
                 "model.gradient_checkpointing=false",
                 "trainer.bf16=false", "data.sources=[{path: %s, sample: 'first:8'}]" % (shapes / "train.dense.jsonl"),
                 "data.eval_sources=[]", "data.num_workers=0", "callbacks=[]",
                 "model.lora.r=8"]  # the shipped rank 32 exceeds the tiny model's k_proj (32 -> 16): refused
    trainer = Engine(CONFIGS / "qwen3vl-stage2-gkd.yaml", overrides)._build()
    assert trainer.teacher_dir == tiny_qwen3
    trainable = {trainer.bundle.part_of(n) for n, p in trainer.bundle.model.named_parameters() if p.requires_grad}
    assert trainable == {"llm", "aligner"}
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_small_cpu_configs_validate(shapes: Path, tmp_path: Path, tiny_qwen25: Path) -> None:
    cfg = load_config(CONFIGS / "small-cpu.yaml", [f"data.sources=[{shapes / 'train.dense.jsonl'}]",
                                                    f"data.eval_sources=[{shapes / 'heldout.dense.jsonl'}]"])
    assert cfg.model.family == "qwen3_vl" and cfg.trainer.type == "dense_caption" and cfg.eval.generate
    gkd = load_config(CONFIGS / "small-cpu-gkd.yaml", _overrides(tiny_qwen25, shapes, tmp_path))
    assert (gkd.trainer.beta, gkd.trainer.sft_alpha) == (0.5, 1.0) and gkd.model.family is None

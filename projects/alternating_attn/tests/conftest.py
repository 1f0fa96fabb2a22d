"""Session fixtures of the alternating_attn tests: tiny checkpoints on disk and an in-process CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

# Two cores shared by several engineers: one thread per test process.
torch.set_num_threads(1)

#: 4 language-model layers, so layer 1 is a special (alternating) layer; the rest is make_tiny_model's default
TINY_SHAPE = {"text_layers": 4}
REPO = Path(__file__).resolve().parents[3]
PROJECT = REPO / "projects" / "alternating_attn"


@pytest.fixture(scope="session")
def tiny_onevision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain LLaVA-OneVision checkpoint (model, tokenizer, processor), seed 0."""
    from arctic_vl import make_tiny_model

    return make_tiny_model("llava_onevision", tmp_path_factory.mktemp("tiny_ov"), seed=0, **TINY_SHAPE)


@pytest.fixture(scope="session")
def tiny_onevision_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shape as `tiny_onevision` with other random weights (seed 1): a LLaVA-OneVision backbone."""
    from arctic_vl import make_tiny_model

    return make_tiny_model("llava_onevision", tmp_path_factory.mktemp("tiny_ov_other"), seed=1, **TINY_SHAPE)


@pytest.fixture(scope="session")
def qwen2_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 causal LM whose shape is the tiny OneVision's language model (so every tensor fits)."""
    from transformers import Qwen2ForCausalLM

    from arctic_vl import tiny_config

    text_config = tiny_config("llava_onevision", **TINY_SHAPE).text_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = Qwen2ForCausalLM(text_config)
    out = tmp_path_factory.mktemp("qwen2_backbone")
    model.save_pretrained(out)
    return out


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """write_config(model=..., **sections) -> a run YAML in tmp_path (data: any file; nothing here reads it)."""

    def write(name: str = "run.yaml", **sections: object) -> Path:
        (tmp_path / "train.json").write_text("[]\n")
        data = {"data": {"sources": ["train.json"]}, "trainer": {"output_dir": "out", "seed": 0}, **sections}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """cli(*args) runs `arctic_vl ARGS` in-process (the console script's `main`) -> (exit code, stdout, stderr)."""
    from arctic_vl.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run

"""Session fixtures of the dense_caption tests: the synthetic data, a tiny Qwen2.5-VL checkpoint, one thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tests import e2e_utils

synthetic_data = e2e_utils.synthetic_data  # a session fixture shared with the core's tests

# Two cores shared by several engineers: one thread per test process.
torch.set_num_threads(1)

# The property tests draw the same examples on every run (a suite that passes on a clean clone passes again);
# HYPOTHESIS_PROFILE=explore draws fresh, many more, to hunt for new counterexamples while developing.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", max_examples=2000, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[3]
PROJECT = REPO / "projects" / "dense_caption"
#: the smallest model that shows the behaviour: 64px images in 8px patches -> 16 image tokens
TINY = {"text_layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "vision_layers": 1,
        "vision_hidden": 32, "patch_size": 8, "image_size": 64}


@pytest.fixture(scope="session")
def shapes(synthetic_data: Path) -> Path:
    """The synthetic shapes data (200 train, 50 held out; the core's session fixture) with its dense JSONL."""
    return synthetic_data


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL checkpoint (pixel-coordinate answers) on disk."""
    from arctic_vl import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_q25"), seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-VL checkpoint (norm1000 answers) on disk."""
    from arctic_vl import make_tiny_model

    return make_tiny_model("qwen2_vl", tmp_path_factory.mktemp("tiny_q2"), seed=0, **TINY)


@pytest.fixture
def cli_in_process(capsys: pytest.CaptureFixture[str]):
    """cli_in_process(*args) runs `arctic_vl ARGS` in this process -> (exit code, stdout, stderr)."""
    from arctic_vl.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run

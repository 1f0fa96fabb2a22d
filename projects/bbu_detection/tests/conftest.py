"""Fixtures of the bbu_detection tests: tiny Qwen-VL checkpoints, the synthetic detection data, an in-process CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# the core tests' in-process CLI fixture: cli(*args) -> (exit code, stdout, stderr)
from tests.conftest import cli  # noqa: F401

# Two cores shared by several engineers: one thread per test process.
torch.set_num_threads(1)



@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL checkpoint (model, tokenizer, processor), seed 0."""
    from arctic_vl import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen25"), seed=0)


@pytest.fixture(scope="session")
def bbu_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic teacher/student detection records: 24 train, 8 held out, 64-pixel images."""
    from bbu_detection.synthetic import make_detection_data

    out = tmp_path_factory.mktemp("bbu_data")
    make_detection_data(out, n=24, heldout=8, seed=0)
    return out

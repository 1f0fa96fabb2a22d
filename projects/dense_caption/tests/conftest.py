"""Session fixtures of the dense_caption tests: the synthetic data, a tiny Qwen2.5-VL checkpoint, one thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two cores shared by several engineers: one thread per test process.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[3]
PROJECT = REPO / "projects" / "dense_caption"
#: the smallest model that shows the behaviour: 64px images in 8px patches -> 16 image tokens
TINY = {"text_layers": 2, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "vision_layers": 1,
        "vision_hidden": 32, "patch_size": 8, "image_size": 64}


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic shapes data (120 train, 50 held out), with its dense-caption JSONL."""
    from arctic_vl import make_synthetic_data

    out = tmp_path_factory.mktemp("shapes")
    make_synthetic_data(out, n=120, seed=0)
    return out


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

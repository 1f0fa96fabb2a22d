"""Fixtures for the model-layer tests: one tiny checkpoint per family, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arctic_vl.models.families import FAMILIES

# Two cores shared by several engineers: one thread per test process.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family name -> directory of a saved tiny model (seed 0, default shape)."""
    from arctic_vl.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, root / family, seed=0) for family in FAMILIES}

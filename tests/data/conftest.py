"""Shared fixtures for the data tests: a small synthetic dataset and tiny image files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from arctic_vl.data.synthetic import make_synthetic_data


def write_png(path: Path, size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A solid-colour PNG at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    """Records as JSONL; a str record is written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def png():
    """Factory fixture: png(path, size=(8, 6), colour=(255, 0, 0)) -> path."""
    return write_png


@pytest.fixture
def jsonl():
    """Factory fixture: jsonl(path, records) -> path."""
    return write_jsonl


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 train + 10 held-out synthetic records in all three formats (seed 0)."""
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_data(out, n=40, seed=0, heldout=10)
    return out

"""Helpers for end-to-end tests: tiny models, synthetic data and CLI runs in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_python(code: str, *args: str, cwd: Path | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (argv after the snippet are `args`)."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(**env))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`arctic_vl ARGS` in a subprocess."""
    return run_python("import sys; from arctic_vl.cli import main; sys.exit(main())", *args, cwd=cwd,
                      timeout=timeout, **env)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ shared fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic shapes data (200 train, 50 held out), written once per test session."""
    from arctic_vl.data.synthetic import make_synthetic_data

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_data(out, n=200, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-NeXT checkpoint (with tokenizer and processor) on disk."""
    from arctic_vl.models.tiny import make_tiny_model

    return make_tiny_model("llava_next", tmp_path_factory.mktemp("tiny_llava"), seed=0)

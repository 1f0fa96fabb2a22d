"""Fixtures shared by the core tests: configs written into tmp_path, the CLI in-process and in a subprocess."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

# The session fixtures of the end-to-end tests, for every test module (no per-module import to shadow).
from tests.e2e_utils import synthetic_data, tiny_llava  # noqa: F401

# Two cores shared by several engineers: one thread per test process.
torch.set_num_threads(1)
# DeepSpeed JIT-compiles a C++ op at every process-group start; torch caches it under a directory keyed by
# nothing but the name, so virtualenvs on one machine rebuild it in turn (minutes each under load). One cache
# per virtualenv: every launch after the first reuses this one's build. Child processes inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

# The encoded-records cache of a test run (its xdist workers and subprocesses too) lives in a fresh directory,
# removed at the end, not in ~/.cache.
if "ARCTIC_VL_CACHE_DIR" not in os.environ:
    os.environ["ARCTIC_VL_CACHE_DIR"] = tempfile.mkdtemp(prefix="arctic_vl_cache_")
    atexit.register(shutil.rmtree, os.environ["ARCTIC_VL_CACHE_DIR"], ignore_errors=True)

#: a minimal valid config: needs nothing on disk but `train.json` next to it
GOOD_CONFIG = """\
model:
  family: llava_next
data:
  sources:
    - train.json
trainer:
  max_steps: 2
"""


def run_cli(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None,
            pythonpath: Sequence[str | Path] = (), timeout: float = 120) -> tuple[int, str, str]:
    """`arctic_vl ARGS...` in a fresh Python process (the console script's entry, `arctic_vl.cli:main`).

    Returns (exit code, stdout, stderr). `pythonpath` entries go in front of PYTHONPATH (e.g. a plugin dir).
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    paths = [str(p) for p in pythonpath]
    if full_env.get("PYTHONPATH"):
        paths.append(full_env["PYTHONPATH"])
    if paths:
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from arctic_vl.cli import main; sys.exit(main())", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def cli_subprocess() -> Callable[..., tuple[int, str, str]]:
    """Factory fixture: cli_subprocess(*args, cwd=..., env=..., pythonpath=[...]) -> (rc, stdout, stderr)."""
    return run_cli


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Factory fixture: cli(*args) runs `arctic_vl.cli.main(list(args))` in-process -> (rc, stdout, stderr)."""
    from arctic_vl.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before
        rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Factory fixture: write(relpath, text) -> path under tmp_path (dedented; parents created)."""

    def _write(rel: str, text: str) -> Path:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return _write


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path, with an (empty) `train.json` data file there; returns tmp_path."""
    (tmp_path / "train.json").write_text("[]\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def good_yaml(in_tmp: Path) -> Path:
    """`good.yaml` (GOOD_CONFIG) in tmp_path, which is the cwd."""
    path = in_tmp / "good.yaml"
    path.write_text(GOOD_CONFIG)
    return path


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The messages logged at WARNING or above while the test runs (loguru), in order."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    yield lines
    logger.remove(sink)

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


def run_python(
    code: str, *args: str, cwd: Path | None = None, timeout: int = 300, **env: str
) -> subprocess.CompletedProcess:
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


def write_eval_file(synthetic: Path) -> Path:
    """Five held-out LLaVA records of uneven question types (colour x3, count, text-only), next to the synthetic
    images: however they are ordered, two ranks see different types and a different number of samples, and
    some rank answers a text-only question while another answers an image one."""
    records = json.loads((synthetic / "heldout.llava.json").read_text())
    wanted = {"colour": 3, "count": 1, "text": 1}
    chosen = [r for q, k in wanted.items() for r in [r for r in records if r["qtype"] == q][:k]]
    out = synthetic / "eval_uneven.llava.json"
    out.write_text(json.dumps(chosen))
    return out


#: Registers a `kill_at` callback in a child process: the main process SIGKILLs itself at the end of step N.
KILL_AT_CALLBACK = r"""
import os, signal, sys
from arctic_vl.callbacks.base import Callback
from arctic_vl.registry import CALLBACKS, ComponentConfig

class KillConfig(ComponentConfig):
    type: str = "kill_at"
    step: int

@CALLBACKS.register("kill_at")
class KillAt(Callback):
    config_class = KillConfig
    def on_step_end(self, trainer, info):
        if info.step == self.config.step and trainer.is_main:
            os.kill(os.getpid(), signal.SIGKILL)

"""

#: Registers a `term_at` callback: at the end of step N each rank in `ranks` sends itself SIGTERM, rank r after
#: r x `stagger_ms` (a scheduler's signals reach the processes of a job a little apart).
TERM_AT_CALLBACK = r"""
import os, signal, sys, time
from arctic_vl.callbacks.base import Callback
from arctic_vl.registry import CALLBACKS, ComponentConfig

class TermConfig(ComponentConfig):
    type: str = "term_at"
    step: int
    ranks: list[int] = [0]
    stagger_ms: int = 0

@CALLBACKS.register("term_at")
class TermAt(Callback):
    config_class = TermConfig
    def on_step_end(self, trainer, info):
        rank = trainer.dist.rank
        if info.step == self.config.step and rank in self.config.ranks:
            time.sleep(rank * self.config.stagger_ms / 1000)
            os.kill(os.getpid(), signal.SIGTERM)

"""

#: A child that trains: `MODE ARG CONFIG`; MODE plain | kill_step (SIGKILL at step ARG) | kill_in_save (SIGKILL
#: in the middle of writing checkpoint step-ARG).
TRAIN_CHILD = KILL_AT_CALLBACK + r"""
mode, arg = sys.argv[1], sys.argv[2]
overrides = []
if mode == "kill_step":
    overrides = ["callbacks=[{type: kill_at, step: %s}]" % arg]
elif mode == "kill_in_save":
    import torch
    import arctic_vl.checkpoint.checkpointer as ck
    real_save = torch.save
    def save(obj, f, *a, **k):
        if f".tmp-step-{arg}" in str(f) and str(f).endswith("optimizer.pt"):
            real_save(obj, f, *a, **k)          # half of the checkpoint is on disk ...
            os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies
        return real_save(obj, f, *a, **k)
    ck.torch.save = save
from arctic_vl.engine import Engine
Engine(sys.argv[3], overrides).train()
"""


def train_child(config: Path, mode: str = "plain", arg: str = "0") -> int:
    """Train `config` in a fresh interpreter (see TRAIN_CHILD); a plain run must succeed. Returns the exit code."""
    proc = run_python(TRAIN_CHILD, mode, arg, str(config), cwd=config.parent)
    if mode == "plain":
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


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

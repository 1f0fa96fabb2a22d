"""GKD under DeepSpeed ZeRO-3 on 2 CPU processes (gloo): the student generates in lockstep although the ranks hold
different numbers of rows (step 2: 3 samples, so rank 0 completes 2 rows and rank 1 one), and the dense
evaluation generates in lockstep on an odd number of eval items (rank 1 holds a padding item). Before every
process made the same number of `generate` calls, a rank waited in a collective its peer never joined."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e_utils import read_metrics, subprocess_env, write_yaml

from .conftest import TINY

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from arctic_vl import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_teacher_z3"), seed=1, **TINY)


def test_zero3_student_generates_in_lockstep_with_uneven_rows(tiny_qwen25: Path, teacher: Path, shapes: Path,
                                                              tmp_path: Path) -> None:
    from arctic_vl import Engine
    from arctic_vl.distributed.deepspeed_backend import free_port

    config = write_yaml(tmp_path / "z3.yaml", {
        "model": {"name_or_path": str(tiny_qwen25)},
        "data": {"type": "dense_caption", "micro_batch_size": 2, "max_length": 256, "num_workers": 0,
                 "shuffle": False,
                 "sources": [{"path": str(shapes / "train.dense.jsonl"), "sample": "first:7"}],
                 "eval_sources": [{"path": str(shapes / "heldout.dense.jsonl"), "sample": "first:3"}]},
        "trainer": {"type": "gkd", "output_dir": str(tmp_path / "z3"), "max_steps": 2, "seed": 0,
                    "progress_bar": False, "teacher": str(teacher), "beta": 0.5, "sft_alpha": 1.0, "lmbda": 1.0,
                    "max_completion_length": 3},
        "optimizer": {"lr": 1e-3}, "callbacks": [],
        "distributed": {"type": "deepspeed", "zero_stage": 3},
        "eval": {"generate": True, "max_new_tokens": 4},
    })
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(BIN / "arctic_vl"), str(config)]
    # its own session, so a hung run's ranks (torchrun's children) are killed with it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired as e:  # a rank left waiting in a collective: the fault under test
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the 2-process ZeRO-3 GKD run hung (a rank waiting on a generate its peer skipped)") from e
    assert proc.returncode == 0, stderr[-3000:]
    lines = read_metrics(tmp_path / "z3")
    assert [(m["step"], m["student_generated"], m["dataset_completions"], m["samples"]) for m in lines] == [
        (1, 1, 0, 4), (2, 1, 0, 3)]
    assert all(m["label_tokens"] <= m["samples"] * 3 for m in lines)  # every sample completed (<= 3 tokens)
    (two,) = [json.loads(x) for x in (tmp_path / "z3" / "eval.jsonl").read_text().splitlines()]
    one = Engine(config, ["distributed={type: single}"]).evaluate()  # one process on the export
    assert two["answers"] == one["answers"] == 3
    for key in ("eval_label_tokens", "json_valid_rate", "truncated_answers"):
        assert two[key] == one[key], key
    for key in ("eval_loss", "eval_kl_loss", "eval_sft_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key

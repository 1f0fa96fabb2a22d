"""Stage-A / Stage-B answer with the run's newest weights: a run killed before its export (no final/) answers
with its latest checkpoint on the rebuilt model, exactly as the finished run's final/ does, and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e_utils import write_yaml

from .conftest import TINY


def _config(run: Path, shapes: Path) -> dict:
    return {
        "model": {"family": "qwen2_5_vl", "tiny": TINY, "freeze": ["vision"]},
        "data": {"type": "dense_caption", "micro_batch_size": 4, "max_length": 256, "summary_ratio": 0.5,
                 "sources": [{"path": str(shapes / "train.dense.jsonl"), "sample": "first:8"}]},
        "trainer": {"type": "dense_caption", "output_dir": str(run), "max_steps": 2, "seed": 0, "progress_bar": False},
        "optimizer": {"lr": 1e-2},
    }


@pytest.fixture(scope="module")
def runs(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 2-step run and a copy of it without final/ (killed after its last checkpoint)."""
    from arctic_vl import Engine

    root = tmp_path_factory.mktemp("dense_weights")
    done = write_yaml(root / "done.yaml", _config(root / "done", shapes))
    Engine(done).train()
    shutil.copytree(root / "done", root / "killed", ignore=shutil.ignore_patterns("final"))
    killed = write_yaml(root / "killed.yaml", _config(root / "killed", shapes))
    return {"root": root, "done": done, "killed": killed}


def test_stage_a_and_b_of_a_killed_run_use_its_latest_checkpoint(runs, shapes, cli_in_process, tmp_path):
    from loguru import logger

    code, _, err = cli_in_process("dense-caption", "make-stage-data", str(shapes / "heldout.dense.jsonl"),
                                  "--out-dir", str(tmp_path), "--group-size", "2")
    assert code == 0, err
    (tmp_path / "one.jsonl").write_text((tmp_path / "groups.jsonl").read_text().splitlines()[0] + "\n")
    ckpt = runs["root"] / "killed" / "checkpoints" / "step-2"
    texts: dict[str, dict[str, str]] = {}
    for name in ("done", "killed"):
        summaries, verdicts = tmp_path / f"{name}.summaries.jsonl", tmp_path / f"{name}.verdicts.jsonl"
        lines: list[str] = []
        sink = logger.add(lines.append, level="INFO", format="{message}")
        try:
            code, out, err = cli_in_process("dense-caption", "stage-a", str(runs[name]), "--images",
                                            str(tmp_path / "one.jsonl"), "--out", str(summaries),
                                            "--max-new-tokens", "8")
            assert code == 0, err
            a = json.loads(out)
            code, out, err = cli_in_process("dense-caption", "stage-b", str(runs[name]), "--summaries",
                                            str(summaries), "--out", str(verdicts), "--max-retries", "1",
                                            "--max-new-tokens", "8")
            assert code == 0, err
            b = json.loads(out)
        finally:
            logger.remove(sink)
        want = runs["root"] / "done" / "final" if name == "done" else ckpt
        assert a["model"] == b["model"] == str(want) and a["step"] == b["step"] == 2
        kind = "final" if name == "done" else "checkpoint"
        assert sum(f"weights: {kind} {want} (step 2)" in x for x in lines) == 2, lines
        texts[name] = {"a": summaries.read_text(), "b": verdicts.read_text()}
    assert texts["killed"] == texts["done"], "the step-2 checkpoint answers exactly as final/ (step 2)"


def test_no_weights_exits_2_naming_the_run(shapes, cli_in_process, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", _config(tmp_path / "run", shapes))
    code, _, err = cli_in_process("dense-caption", "stage-a", str(config), "--images", str(shapes / "images"),
                                  "--out", str(tmp_path / "o.jsonl"))
    assert code == 2 and f"{tmp_path / 'run'}: no trained weights" in err and "--model DIR" in err, err

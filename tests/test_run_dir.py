"""A run directory that was moved, or whose metrics.jsonl was torn by a kill, still resumes exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e_utils import read_metrics, write_yaml


@pytest.fixture
def make_config(tiny_llava: Path, synthetic_data: Path):
    def make(directory: Path, max_steps: int) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return write_yaml(directory / "run.yaml", {
            "model": {"name_or_path": str(tiny_llava)},
            "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:24"}],
                     "micro_batch_size": 4, "max_length": 256},
            "trainer": {"output_dir": "out", "max_steps": max_steps, "progress_bar": False, "seed": 5},
            "optimizer": {"lr": 2e-3},
            "scheduler": {"type": "constant"},  # the LR does not depend on the run length that changes here
            "checkpoint": {"every_n_steps": 2},
        })
    return make


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, make_config):
    from arctic_vl import Engine

    config = make_config(tmp_path / "run", 2)
    Engine(config).train()
    metrics = tmp_path / "run" / "out" / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 3, "epoch": 0, "lo')  # a kill in the middle of writing step 3's line
    Engine(config, ["trainer.max_steps=4"]).train()
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "out")] == [1, 2, 3, 4]


def test_a_corrupt_metrics_line_before_the_last_is_named(tmp_path, make_config):
    from arctic_vl import Engine
    from arctic_vl.errors import RunFailed

    config = make_config(tmp_path / "run", 2)
    Engine(config).train()
    metrics = tmp_path / "run" / "out" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(RunFailed, match=r"metrics\.jsonl: line 2 is not a JSON object"):
        Engine(config, ["trainer.max_steps=4"]).train()


def test_a_moved_run_directory_resumes_exactly(tmp_path, make_config):
    from arctic_vl import Engine

    reference = make_config(tmp_path / "reference", 4)
    Engine(reference).train()
    first = make_config(tmp_path / "first", 2)
    Engine(first).train()
    moved = tmp_path / "elsewhere" / "out"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "first" / "out"), str(moved))
    Engine(first, [f"trainer.output_dir={moved}", "trainer.max_steps=4"]).train()
    got, want = read_metrics(moved), read_metrics(tmp_path / "reference" / "out")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) <= 1e-6

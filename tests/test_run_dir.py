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


def test_a_full_disk_while_logging_names_the_file_and_the_run_resumes(tmp_path, make_config, monkeypatch):
    """The disk fills while step 3's metrics line is written: a CheckpointError (exit 1) naming metrics.jsonl and
    the disk, not a raw OSError; the next run resumes from the step-2 checkpoint and logs steps 3 and 4 once."""
    import errno

    from arctic_vl import Engine
    from arctic_vl.checkpoint import files
    from arctic_vl.errors import CheckpointError

    config = make_config(tmp_path / "run", 2)
    Engine(config).train()
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", full, raising=False)
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: the disk is full at .*this run file needs about "
                                              r".*the run resumes from its latest checkpoint"):
        Engine(config, ["trainer.max_steps=4"]).train()
    monkeypatch.undo()
    Engine(config, ["trainer.max_steps=4"]).train()
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "out")] == [1, 2, 3, 4]


def test_an_unwritable_run_file_exits_1_naming_it(tmp_path, make_config, cli):
    """run_info.json cannot be written (a directory sits at its path): exit 1 with the path, no traceback."""
    config = make_config(tmp_path / "run", 1)
    (tmp_path / "run" / "out" / "run_info.json").mkdir(parents=True)
    rc, _, err = cli("train", str(config))
    assert rc == 1, err[-2000:]
    assert "run_info.json: cannot write this run file" in err and "Traceback" not in err

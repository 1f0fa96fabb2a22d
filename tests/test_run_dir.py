"""A run directory that was moved, or whose metrics.jsonl was torn by a kill, still resumes exactly."""

from __future__ import annotations

import os
import re
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


# ------------------------------------------------------------------ symbolic links where the run writes
#: 920 bytes of someone else's file: a link planted at a path the run writes must leave them as they are
OUTSIDE = b"someone else's file\n" * 46
#: every name the run writes under OUTPUT_DIR (files, their temporary names, folders)
LINKED_FILES = [".lock", "metrics.jsonl", "eval.jsonl", "eval_standalone.jsonl", "config.yaml", "run_info.json",
                "summary.json", "trackers.json", ".config.yaml.tmp", ".metrics.jsonl.tmp"]
LINKED_DIRS = ["checkpoints", "final", ".tmp-final", "base_model"]


def _plant(link: Path, victim: Path, is_dir: bool) -> None:
    if is_dir:
        victim.mkdir()
        (victim / "keep.bin").write_bytes(OUTSIDE)
    else:
        victim.write_bytes(OUTSIDE)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)


def _untouched(victim: Path, is_dir: bool) -> None:
    if is_dir:
        assert sorted(p.name for p in victim.iterdir()) == ["keep.bin"]
        assert (victim / "keep.bin").read_bytes() == OUTSIDE
    else:
        assert victim.read_bytes() == OUTSIDE


@pytest.mark.parametrize("name", LINKED_FILES + LINKED_DIRS)
def test_a_symlink_where_the_run_writes_exits_2_and_its_target_is_untouched(tmp_path, make_config, cli, name):
    """A link at any path the run writes (the lock, each run file, a temporary name, a folder): exit 2 naming it
    before anything is written, the link's target byte for byte as it was (before: `.lock` was truncated to 0
    bytes and the run exited 0; metrics.jsonl was appended to)."""
    config = make_config(tmp_path / "run", 1)
    out = tmp_path / "run" / "out"
    victim, is_dir = tmp_path / "victim", name in LINKED_DIRS
    _plant(out / name, victim, is_dir)
    rc, _, err = cli("train", str(config))
    assert rc == 2, err[-2000:]
    assert f"{out / name}: is a symbolic link (to {victim})" in err and "Traceback" not in err, err[-2000:]
    _untouched(victim, is_dir)
    assert (out / name).is_symlink()


def test_a_lock_that_is_a_directory_exits_2_naming_it(tmp_path, make_config, cli):
    config = make_config(tmp_path / "run", 1)
    (tmp_path / "run" / "out" / ".lock").mkdir(parents=True)
    rc, _, err = cli("train", str(config))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert f"{tmp_path / 'run' / 'out' / '.lock'}: is a directory" in err


def test_a_hard_linked_lock_is_refused(tmp_path):
    from arctic_vl.checkpoint.lock import RunLock
    from arctic_vl.errors import ConfigError

    victim = tmp_path / "victim"
    victim.write_bytes(OUTSIDE)
    (tmp_path / "out").mkdir()
    os.link(victim, tmp_path / "out" / ".lock")
    with pytest.raises(ConfigError, match=r"\.lock: has 2 hard links"):
        RunLock.acquire(tmp_path / "out")
    assert victim.read_bytes() == OUTSIDE


def _write_metrics(out: Path) -> None:
    from arctic_vl.checkpoint.files import append_line

    append_line(out / "metrics.jsonl", '{"step": 1}')


def _write_config(out: Path) -> None:
    from arctic_vl.checkpoint.files import write_run_file

    write_run_file(out / "config.yaml", "a: 1\n")


def _write_checkpoint_json(out: Path) -> None:
    from arctic_vl.checkpoint.files import save_json

    save_json({"step": 1}, out / "trainer_state.json", 100)


def _write_trackers(out: Path) -> None:
    from arctic_vl.callbacks.trackers import save_run

    save_run(out, "wandb", {"id": "abc"})


def _write_export_dir(out: Path) -> None:
    from arctic_vl.config.run_files import fresh_dir

    fresh_dir(out / ".tmp-final")


def _remove_final(out: Path) -> None:
    from arctic_vl.config.run_files import remove_tree

    remove_tree(out / "final")


class _OneProcess:
    """The single-process backend's part that `Checkpointer.save` uses."""

    is_main, rank = True, 0

    def unwrap(self, model):
        return model

    def barrier(self):
        pass

    def save_state(self, model, optimizer, path):
        return False


def _save_checkpoint(out: Path) -> None:
    import torch

    from arctic_vl.checkpoint.checkpointer import CheckpointConfig, Checkpointer

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    Checkpointer(CheckpointConfig(), out).save(step=3, model=model, optimizer=optimizer, scheduler=scheduler,
                                                 trainer_state={"step": 3, "epoch": 0, "batch_in_epoch": 3},
                                                 dist=_OneProcess())


WRITERS = [  # (what writes, the path it writes under OUTPUT_DIR, whether that is a folder)
    (_write_metrics, "metrics.jsonl", False),
    (_write_config, "config.yaml", False),
    (_write_config, ".config.yaml.tmp", False),
    (_write_checkpoint_json, "trainer_state.json", False),
    (_write_trackers, "trackers.json", False),
    (_write_trackers, ".trackers.json.tmp", False),
    (_write_export_dir, ".tmp-final", True),
    (_remove_final, "final", True),
    (_save_checkpoint, "checkpoints", True),
    (_save_checkpoint, "checkpoints/.tmp-step-3", True),
    (_save_checkpoint, "checkpoints/step-3", True),
]


@pytest.mark.parametrize(("write", "name", "is_dir"), WRITERS, ids=[f"{w.__name__}:{n}" for w, n, _ in WRITERS])
def test_each_write_in_the_run_dir_refuses_a_symlink_that_appears_during_the_run(tmp_path, write, name, is_dir):
    """The start-up check aside, every writer itself refuses a link at its path (one planted while the run goes
    on): a ConfigError (exit 2) naming it, the target untouched."""
    from arctic_vl.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    _plant(out / name, victim, is_dir)
    with pytest.raises(ConfigError, match=f"{re.escape(str(out / name))}: is a symbolic link"):
        write(out)
    _untouched(victim, is_dir)


def test_the_writers_still_write_without_links(tmp_path):
    """The same writers on a clean run directory: each file holds what was written."""
    import json

    out = tmp_path / "out"
    out.mkdir()
    for write, _, _ in WRITERS:
        write(out)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (out / "config.yaml").read_text() == "a: 1\n"
    assert json.loads((out / "trackers.json").read_text()) == {"wandb": {"id": "abc"}}
    assert sorted(p.name for p in (out / "checkpoints" / "step-3").iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng-rank0.pt", "scheduler.pt", "trainer_state.json"]
    assert (out / ".tmp-final").is_dir() and not (out / "final").exists()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_an_output_dir_that_is_a_broken_symlink_exits_2_naming_it(tmp_path, make_config, cli, kind):
    config = make_config(tmp_path / "run", 1)
    out = tmp_path / "run" / "out"
    if kind == "dangling":
        out.symlink_to(tmp_path / "nowhere")
        want = f"trainer.output_dir: {out} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"
    else:
        out.symlink_to(tmp_path / "run" / "out2")
        (tmp_path / "run" / "out2").symlink_to(out)
        want = "a symbolic link loop"  # named by the one path resolver (`resolve_user_path`)
    rc, _, err = cli("train", str(config))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert "run.yaml:" in err and want in err, err[-2000:]
    assert not (tmp_path / "nowhere").exists()


def test_a_stray_incomplete_checkpoint_is_ignored_and_the_run_resumes_exactly(tmp_path, make_config, warnings):
    """A `checkpoints/step-999/` holding only a trainer_state.json (before: refused with a list of 'settings that
    differ'): a warning names it and the run resumes from step-2 with the losses of an uninterrupted run."""
    import json

    from arctic_vl import Engine

    reference = make_config(tmp_path / "reference", 4)
    Engine(reference).train()
    config = make_config(tmp_path / "run", 2)
    Engine(config).train()
    stray = tmp_path / "run" / "out" / "checkpoints" / "step-999"
    stray.mkdir()
    (stray / "trainer_state.json").write_text(json.dumps({"step": 999, "epoch": 0, "batch_in_epoch": 0}))
    Engine(config, ["trainer.max_steps=4"]).train()
    assert any(f"{stray}: checkpoint fails verification" in w and "incomplete" in w for w in warnings), warnings
    got, want = read_metrics(tmp_path / "run" / "out"), read_metrics(tmp_path / "reference" / "out")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, want)) <= 1e-6


def test_links_planted_inside_an_unfinished_base_model_are_not_written_through(tmp_path, make_config):
    """OUTPUT_DIR/base_model/ without a config.json (an interrupted write) holding a link: the inline tiny model is
    written into a fresh folder, the link's target untouched."""
    import yaml

    from arctic_vl import Engine

    config = make_config(tmp_path / "run", 1)
    data = yaml.safe_load(config.read_text())
    data["model"] = {"family": "llava_next"}
    config.write_text(yaml.safe_dump(data))
    victim = tmp_path / "victim"
    victim.write_bytes(OUTSIDE)
    base = tmp_path / "run" / "out" / "base_model"
    base.mkdir(parents=True)
    (base / "tokenizer.json").symlink_to(victim)
    Engine(config).train()
    assert victim.read_bytes() == OUTSIDE
    assert not (base / "tokenizer.json").is_symlink() and (base / "config.json").is_file()


#: files written in place (config.yaml is renamed over: a hard link there is replaced, never written through)
IN_PLACE = [w for w in WRITERS if not w[2] and w[1] != "config.yaml"]


@pytest.mark.parametrize(("write", "name", "is_dir"), IN_PLACE, ids=[f"{w.__name__}:{n}" for w, n, _ in IN_PLACE])
def test_each_file_write_refuses_a_hard_link_without_truncating_it(tmp_path, write, name, is_dir):
    """A hard link to someone's file where a run file is written in place: refused by name, the file keeps its
    bytes (the check comes before any truncation)."""
    from arctic_vl.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(OUTSIDE)
    os.link(victim, out / name)
    with pytest.raises(ConfigError, match=f"{re.escape(str(out / name))}: has 2 hard links"):
        write(out)
    assert victim.read_bytes() == OUTSIDE

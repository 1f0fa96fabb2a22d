"""Exact resume: a run killed with SIGKILL and rerun writes the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e_utils import TRAIN_CHILD, read_metrics, run_python, train_child, write_yaml


@pytest.fixture(scope="module")
def run_config(tiny_llava: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory):
    def make(name: str, *, workers: int = 0, max_steps: int = 12, every: int = 3) -> Path:
        d = tmp_path_factory.mktemp(name)
        return write_yaml(d / "run.yaml", {
            "model": {"name_or_path": str(tiny_llava)},
            # 60 samples, micro-batch 4, accumulation 2: 15 micro-batches = 8 steps an epoch (the last one short)
            "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:60"}],
                     "micro_batch_size": 4, "max_length": 256, "num_workers": workers},
            "trainer": {"output_dir": "out", "max_steps": max_steps, "gradient_accumulation_steps": 2,
                        "progress_bar": False, "seed": 7},
            "optimizer": {"lr": 3e-3},
            "scheduler": {"type": "cosine", "warmup_steps": 2},
            "checkpoint": {"every_n_steps": every, "keep_last": 2},
        })
    return make


@pytest.fixture(scope="module")
def reference(run_config) -> list[dict]:
    config = run_config("reference")
    train_child(config)
    return read_metrics(config.parent / "out")


def _assert_same_losses(run_dir: Path, reference: list[dict]) -> None:
    got = read_metrics(run_dir)
    assert [m["step"] for m in got] == list(range(1, 13)), "each step exactly once"
    assert [m["epoch"] for m in got] == [m["epoch"] for m in reference]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(got, reference))
    assert diff <= 1e-6, f"max loss difference {diff}"
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(got, reference)) <= 1e-5


def test_reference_crosses_an_epoch(reference):
    assert [m["epoch"] for m in reference] == [0] * 8 + [1] * 4
    assert reference[7]["samples"] == 4  # the epoch's short last step: one micro-batch
    assert reference[-1]["loss"] < reference[0]["loss"]


@pytest.mark.parametrize("kill_step", [5, 8, 10], ids=["mid-epoch", "at-epoch-end", "after-epoch-boundary"])
def test_sigkill_and_rerun_is_exact(run_config, reference, kill_step):
    config = run_config(f"kill{kill_step}")
    assert train_child(config, "kill_step", str(kill_step)) == -9
    before = read_metrics(config.parent / "out")
    assert before[-1]["step"] == kill_step
    train_child(config)
    _assert_same_losses(config.parent / "out", reference)


def test_sigkill_with_dataloader_workers(run_config, reference):
    config = run_config("workers", workers=2)
    assert train_child(config, "kill_step", "7") == -9
    train_child(config)
    _assert_same_losses(config.parent / "out", reference)


def test_kill_during_checkpoint_write_keeps_previous(run_config, reference):
    config = run_config("killsave")
    assert train_child(config, "kill_in_save", "6") == -9
    ckpts = config.parent / "out" / "checkpoints"
    assert (ckpts / ".tmp-step-6").is_dir(), "the interrupted write stays in its temporary folder"
    assert not (ckpts / "step-6").exists()
    assert (ckpts / "step-3" / "trainer_state.json").is_file()
    from arctic_vl.checkpoint.checkpointer import CheckpointConfig, Checkpointer

    assert Checkpointer(CheckpointConfig(), config.parent / "out").latest().name == "step-3"
    train_child(config)
    _assert_same_losses(config.parent / "out", reference)
    assert not (ckpts / ".tmp-step-6").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-12", "step-9"], "keep_last: 2"


def test_finished_run_says_so_and_changed_settings_refuse(run_config, reference):
    config = run_config("finished", max_steps=2, every=1)
    train_child(config)
    proc = run_python("import sys; from arctic_vl.cli import main; sys.exit(main())", "train", str(config),
                      cwd=config.parent)
    assert proc.returncode == 0
    assert "already finished at step 2" in proc.stderr
    # the run length may change: training continues from step 2
    proc = run_python("import sys; from arctic_vl.cli import main; sys.exit(main())", "train", str(config),
                      "--set", "trainer.max_steps=3", cwd=config.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [m["step"] for m in read_metrics(config.parent / "out")] == [1, 2, 3]
    # anything else that changes the math refuses, naming the setting
    proc = run_python("import sys; from arctic_vl.cli import main; sys.exit(main())", "train", str(config),
                      "--set", "trainer.max_steps=4", "--set", "optimizer.lr=0.5", cwd=config.parent)
    assert proc.returncode == 2
    assert "optimizer.lr: 0.003 -> 0.5" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(config.parent / "out")


def test_rerun_says_it_resumes_and_what_changed_and_resume_policy_refuses(run_config):
    """Issue 19 (11): a rerun with another max_steps says that it resumes, from which step, and every setting that
    changed (old -> new); `trainer.resume: never` refuses a directory that holds a run, `must` one that holds
    nothing to resume (exit 2, naming the directory); `trainer.resume` itself may change on resume."""
    config = run_config("policy", max_steps=2, every=1)
    out = config.parent / "out"
    cli = "import sys; from arctic_vl.cli import main; sys.exit(main())"
    proc = run_python(cli, "train", str(config), "--set", "trainer.resume=must", cwd=config.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"trainer.resume: must, but {out} holds no checkpoint to resume from" in proc.stderr
    assert not (out / "checkpoints").exists()
    train_child(config)
    proc = run_python(cli, "train", str(config), "--set", "trainer.max_steps=3", "--set", "trainer.log_every_n_steps=3",
                      "--set", "trainer.resume=must", cwd=config.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"resuming from {out / 'checkpoints' / 'step-2'} (step 2 of 3, epoch 0); changed: "
            "trainer.log_every_n_steps 1 -> 3; trainer.max_steps 2 -> 3; trainer.resume auto -> must") in proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    proc = run_python(cli, "train", str(config), "--set", "trainer.max_steps=4", "--set", "trainer.resume=never",
                      cwd=config.parent)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"trainer.resume: never, but {out} already holds a run (checkpoint step-3, final/); name a new "
            "trainer.output_dir for a new run") in proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3], "nothing trained"
    shutil.rmtree(out)


def test_corrupt_latest_checkpoint_falls_back_and_stays_exact(run_config, reference):
    """Bytes flipped in the newest checkpoint's weights: the run says so, resumes from the one before, and writes
    the reference losses. The killed run's lock is taken over with a warning."""
    config = run_config("corrupt")
    assert train_child(config, "kill_step", "10") == -9
    ckpts = config.parent / "out" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-6", "step-9"]
    weights = ckpts / "step-9" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor: the header still parses, only the checksum can tell
    weights.write_bytes(bytes(data))
    proc = run_python(TRAIN_CHILD, "plain", "0", str(config), cwd=config.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-9: checkpoint fails verification" in proc.stderr
    assert "model.safetensors: contents differ" in proc.stderr
    assert "falling back to step-6" in proc.stderr and "resuming from" in proc.stderr
    assert "taking over the lock left by pid" in proc.stderr
    _assert_same_losses(config.parent / "out", reference)


def test_resume_on_changed_data_refuses_naming_the_source(tiny_llava, synthetic_data, tmp_path, cli):
    """The data shrank from 48 to 16 records between a stop and a resume: exit 2 naming the source, before the
    loop starts (the loop itself refuses an epoch that yields nothing, so nothing can hang)."""
    import json

    from arctic_vl.engine import Engine

    records = json.loads((synthetic_data / "train.llava.json").read_text())[:48]
    for r in records:
        if r.get("image"):
            r["image"] = str(synthetic_data / r["image"])
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava)},
        "data": {"sources": [str(data)], "micro_batch_size": 4, "max_length": 256},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False},
        "checkpoint": {"every_n_steps": 1, "export_final": False},
    })
    Engine(config).train()
    saved = json.loads((tmp_path / "out" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert saved["data_fingerprint"][str(data)]["records"] == 48
    data.write_text(json.dumps(records[:16]))
    rc, _, err = cli("train", str(config), "--set", "trainer.max_steps=4")
    assert rc == 2, err[-2000:]
    assert f"training source {data} changed since the checkpoint" in err
    assert "records 48 -> 16" in err and "Traceback" not in err

"""Exact resume: a run killed with SIGKILL and rerun writes the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# imported at collection: loguru's default sink keeps the sys.stderr of its import, which must not be the first
# in-process CLI test's captured stream (closed once that test ends)
from loguru import logger  # noqa: F401

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


def _own_data(synthetic_data: Path, out: Path, n: int = 24, pad: int = 0) -> Path:
    """`n` training records with absolute image paths in `out` (each with `pad` bytes of an unused field)."""
    import json

    records = json.loads((synthetic_data / "train.llava.json").read_text())[:n]
    for r in records:
        if r.get("image"):
            r["image"] = str(synthetic_data / r["image"])
        if pad:
            r["note"] = "x" * pad
    out.write_text(json.dumps(records))
    return out


def _resume_config(tmp_path: Path, model: dict, data: Path) -> Path:
    return write_yaml(tmp_path / "run.yaml", {
        "model": model,
        "data": {"sources": [str(data)], "micro_batch_size": 4, "max_length": 256},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False},
        "checkpoint": {"every_n_steps": 1, "export_final": False},
    })


def test_resume_refuses_a_model_directory_replaced_under_the_run(tiny_llava, synthetic_data, tmp_path, cli):
    """freeze: [vision] (frozen weights are not in checkpoints); model.name_or_path's files are replaced by another
    model of the same shape after step 2 (before: resumed to step 4, exit 0, other losses): exit 2 naming the
    directory and the files that changed."""
    import json

    from arctic_vl.models.tiny import make_tiny_model

    model_dir = Path(shutil.copytree(tiny_llava, tmp_path / "base"))
    config = _resume_config(tmp_path, {"name_or_path": str(model_dir), "freeze": ["vision"]},
                            _own_data(synthetic_data, tmp_path / "train.json"))
    assert cli("train", str(config))[0] == 0
    saved = json.loads((tmp_path / "out" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert sorted(saved["model_fingerprint"]["model.name_or_path"]["files"]) == sorted(
        p.name for p in model_dir.iterdir())
    other = make_tiny_model("llava_next", tmp_path / "other", seed=1)
    shutil.copy(other / "model.safetensors", model_dir / "model.safetensors")
    rc, _, err = cli("train", str(config), "--set", "trainer.max_steps=4")
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert (f"cannot resume from step-2: the model directory {model_dir} (model.name_or_path) changed since the "
            "checkpoint: model.safetensors changed") in err, err[-2000:]
    assert not (tmp_path / "out" / "checkpoints" / "step-3").exists()


def test_resume_refuses_a_same_size_edit_in_the_middle_of_a_data_file(tiny_llava, synthetic_data, tmp_path, cli):
    """A 240 KiB data file whose middle record's answer changes by one letter (the same size, far from both
    ends: before, only each end's 64 KiB were hashed and the resume went on): exit 2 naming the source."""
    import json

    data = _own_data(synthetic_data, tmp_path / "train.json", pad=10_000)
    assert data.stat().st_size > 200_000
    config = _resume_config(tmp_path, {"name_or_path": str(tiny_llava)}, data)
    assert cli("train", str(config))[0] == 0
    records = json.loads(data.read_text())
    middle = records[12]["conversations"][-1]
    middle["value"] = middle["value"][:-1] + ("a" if middle["value"][-1] != "a" else "b")
    before = data.stat().st_size
    data.write_text(json.dumps(records))
    assert data.stat().st_size == before
    rc, _, err = cli("train", str(config), "--set", "trainer.max_steps=4")
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert f"training source {data} changed since the checkpoint (digest " in err, err[-2000:]


def test_resume_refuses_a_replaced_image(tiny_llava, synthetic_data, tmp_path, cli):
    """An image a training record names is replaced by another picture under the same name: exit 2 naming the
    source and its images (before: not fingerprinted, the run resumed on other pixels)."""
    import json

    images = Path(shutil.copytree(synthetic_data / "images", tmp_path / "images"))
    data = _own_data(synthetic_data, tmp_path / "train.json")
    records = json.loads(data.read_text())
    for r in records:
        if r.get("image"):
            r["image"] = str(images / Path(r["image"]).name)
    data.write_text(json.dumps(records))
    config = _resume_config(tmp_path, {"name_or_path": str(tiny_llava)}, data)
    assert cli("train", str(config))[0] == 0
    named = sorted({r["image"] for r in records if r.get("image")})
    shutil.copy(named[1], named[0])  # another picture under the first one's name
    rc, _, err = cli("train", str(config), "--set", "trainer.max_steps=4")
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert f"training source {data} changed since the checkpoint (images {{'count': {len(named)}" in err, err[-2000:]


def test_resume_with_unchanged_inputs_still_goes_on(tiny_llava, synthetic_data, tmp_path):
    """The same model directory, data and images: the fingerprints match and the run resumes to step 4."""
    from arctic_vl.engine import Engine

    config = _resume_config(tmp_path, {"name_or_path": str(tiny_llava), "freeze": ["vision"]},
                            _own_data(synthetic_data, tmp_path / "train.json"))
    Engine(config).train()
    assert Engine(config, ["trainer.max_steps=4"]).train()["steps"] == 4
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3, 4]


def test_model_fingerprints_cover_the_model_a_trainers_teacher_and_swiftkvs_teacher(tiny_llava, tmp_path):
    """The model directory (`model.name_or_path`), a trainer's `teacher_dir` (dense_caption's GKD) and the SwiftKV
    factory's teacher are fingerprinted; a same-size edit of the teacher's tokenizer.json is refused by name."""
    from types import SimpleNamespace

    from swiftkv_vl.factory import SwiftKVModelConfig, SwiftKVModelFactory

    from arctic_vl.errors import ConfigError
    from arctic_vl.models.hf import HFModelConfig, HFModelFactory
    from arctic_vl.trainers.base import _check_model_fingerprints, model_fingerprints

    teacher = Path(shutil.copytree(tiny_llava, tmp_path / "teacher"))
    trainer = SimpleNamespace(model_factory=HFModelFactory(HFModelConfig(name_or_path=str(tiny_llava))),
                              output_dir=tmp_path / "out", teacher_dir=teacher)
    saved = model_fingerprints(trainer)
    assert sorted(saved) == ["model.name_or_path", "trainer.teacher"]
    assert saved["trainer.teacher"]["dir"] == str(teacher)
    assert sorted(saved["trainer.teacher"]["files"]) == sorted(p.name for p in teacher.iterdir())
    _check_model_fingerprints("step-2", saved, model_fingerprints(trainer))  # unchanged: no error
    text = (teacher / "tokenizer.json").read_text()
    i = text.index('"vocab"') + 1
    (teacher / "tokenizer.json").write_text(text[:i] + text[i:].replace("vocab", "VOCAB", 1))
    with pytest.raises(ConfigError, match=rf"the model directory {teacher} \(trainer.teacher\) changed since the "
                                          r"checkpoint: tokenizer.json changed"):
        _check_model_fingerprints("step-2", saved, model_fingerprints(trainer))
    swiftkv = SwiftKVModelFactory(SwiftKVModelConfig(teacher=str(tiny_llava), num_key_value_layers=1))
    assert swiftkv.source_dirs(tmp_path / "out") == {"model.teacher": tiny_llava}

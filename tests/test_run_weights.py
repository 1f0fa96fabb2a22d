"""The verbs that read a run's weights (`evaluate`, `export`) use its newest verified weights and say which:
final/ only when it holds the last step, else the latest checkpoint (base model + its trainable weights, LoRA
adapters included); no weights is exit 2 naming the run; the base model only with `--base`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e_utils import write_eval_file, write_yaml


def _config(out: Path, tiny_llava: Path, synthetic_data: Path) -> dict:
    return {
        "model": {"name_or_path": str(tiny_llava), "freeze": ["vision"], "lora": {"r": 4, "parts": ["llm"]}},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                 "eval_sources": [str(write_eval_file(synthetic_data))], "micro_batch_size": 4},
        "trainer": {"output_dir": str(out), "max_steps": 2, "progress_bar": False},
        "optimizer": {"lr": 2e-2},
        "scheduler": {"type": "constant"},  # every step moves the weights (step 3 of the resumed run too)
        "checkpoint": {"every_n_steps": 1, "keep_last": None},
        "eval": {"every_n_steps": 1, "max_samples": 5},
    }


def _moved(cfg: dict, out: Path) -> dict:
    """`cfg` with trainer.output_dir `out`."""
    return {**cfg, "trainer": {**cfg["trainer"], "output_dir": str(out)}}


@pytest.fixture(scope="module")
def runs(tiny_llava: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A LoRA run of 2 steps (final/ at step 2), the same killed before its export (no final/), and the same
    resumed to step 3 with the export off (final/ from step 2, checkpoint step-3)."""
    from arctic_vl.engine import Engine

    root = tmp_path_factory.mktemp("run_weights")
    cfg = _config(root / "done", tiny_llava, synthetic_data)
    done = write_yaml(root / "done.yaml", cfg)
    Engine(done).train()
    shutil.copytree(root / "done", root / "killed")
    shutil.rmtree(root / "killed" / "final")
    shutil.copytree(root / "done", root / "stale")
    killed = write_yaml(root / "killed.yaml", _moved(cfg, root / "killed"))
    stale = write_yaml(root / "stale.yaml", _moved(cfg, root / "stale"))
    Engine(stale, ["trainer.max_steps=3", "checkpoint.export_final=false"]).train()
    assert json.loads((root / "stale" / "final" / "export_info.json").read_text())["step"] == 2
    assert (root / "stale" / "checkpoints" / "step-3").is_dir()
    assert sorted(p.name for p in (root / "killed").iterdir()) == sorted(
        p.name for p in (root / "done").iterdir() if p.name != "final")
    # the training-time evaluation of each step: exactly the weights of that step's checkpoint
    training = {json.loads(x)["step"]: json.loads(x) for x in (root / "stale" / "eval.jsonl").read_text().splitlines()}
    return {"root": root, "done": done, "killed": killed, "stale": stale, "eval": training, "cfg": cfg}


@pytest.fixture
def info_log():
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def _standalone(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval_standalone.jsonl").read_text().splitlines()[-1])


def test_newest_weights_rule(runs):
    from arctic_vl import RunWeights, newest_weights

    root = runs["root"]
    # 8 samples, 4 a step: step 2 ends epoch 0 (the state then says epoch 1), step 3 is in epoch 1
    assert newest_weights(root / "done") == RunWeights(root / "done" / "final", 2, "final", 1)
    assert newest_weights(root / "killed") == RunWeights(root / "killed" / "checkpoints" / "step-2", 2, "checkpoint", 1)
    assert newest_weights(root / "stale") == RunWeights(root / "stale" / "checkpoints" / "step-3", 3, "checkpoint", 1)
    from arctic_vl import ConfigError

    with pytest.raises(ConfigError, match=str(root / "nothing")):
        newest_weights(root / "nothing")


@pytest.mark.parametrize("name, step", [("killed", 2), ("stale", 3)])
def test_evaluate_scores_the_latest_checkpoint_and_says_so(runs, name, step, cli, info_log):
    run_dir = runs["root"] / name
    rc, out, err = cli("evaluate", str(runs[name]))
    assert rc == 0, err
    results = json.loads(out)
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    assert results["step"] == step and results["weights"] == "checkpoint" and results["model"] == str(ckpt)
    assert f"weights: checkpoint {ckpt} (step {step})" in "\n".join(info_log)
    line = _standalone(run_dir)
    assert line["step"] == step
    # exactly what training measured on the weights of that step (LoRA adapters and the aligner included)
    assert line["eval_loss"] == runs["eval"][step]["eval_loss"]
    assert line["eval_label_tokens"] == runs["eval"][step]["eval_label_tokens"]


def test_evaluate_base_is_explicit_and_no_weights_is_exit_2(runs, cli, tmp_path):
    cfg = runs["cfg"]
    empty = write_yaml(tmp_path / "empty.yaml", _moved(cfg, tmp_path / "e"))
    rc, out, err = cli("evaluate", str(empty))
    assert rc == 2 and str(tmp_path / "e") in err and "--base" in err and "Traceback" not in err, err
    assert not (tmp_path / "e" / "eval_standalone.jsonl").exists()
    rc, out, err = cli("evaluate", str(empty), "--base")
    assert rc == 0, err
    base = json.loads(out)
    assert base["step"] == 0 and base["weights"] == "base"
    assert _standalone(tmp_path / "e")["step"] == 0
    # the same base model on a trained run: step 0, and not the trained figures
    rc, out, err = cli("evaluate", str(runs["killed"]), "--base")
    assert rc == 0, err
    again = json.loads(out)
    assert again["step"] == 0 and again["eval_loss"] == base["eval_loss"] != runs["eval"][2]["eval_loss"]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_export_uses_the_newest_weights_and_records_them(runs, cli, tmp_path, info_log):
    root = runs["root"]
    # killed before its export: the step-2 checkpoint, merged exactly as the finished run's final/
    rc, _, err = cli("export", str(root / "killed"), "--out", str(tmp_path / "k"))
    assert rc == 0, err
    assert f"weights: checkpoint {root / 'killed' / 'checkpoints' / 'step-2'} (step 2)" in "\n".join(info_log)
    info = json.loads((tmp_path / "k" / "export_info.json").read_text())
    assert (info["step"], info["epoch"], info["checkpoint"]) == (2, 1, "step-2")
    final = _weights(root / "done" / "final")
    got = _weights(tmp_path / "k")
    assert sorted(got) == sorted(final) and all(torch.equal(got[k], final[k]) for k in final)
    assert (tmp_path / "k" / "adapter" / "adapter_config.json").is_file()
    # final/ older than the latest checkpoint: step-3, not final/ (the older `--merge-lora OUT` form still works)
    rc, _, err = cli("export", str(root / "stale"), "--merge-lora", str(tmp_path / "s"))
    assert rc == 0, err
    assert json.loads((tmp_path / "s" / "export_info.json").read_text())["step"] == 3
    got = _weights(tmp_path / "s")
    assert any(not torch.equal(got[k], final[k]) for k in final), "the step-3 weights, not final/'s"
    rc, _, err = cli("export", str(root / "stale"), "--out", str(tmp_path / "s2"), "--checkpoint", "step-3")
    assert rc == 0, err
    again = _weights(tmp_path / "s2")
    assert all(torch.equal(again[k], got[k]) for k in got)
    # a finished run: its final/ (the export of its last step), with its export info
    rc, _, err = cli("export", str(root / "done"), "--out", str(tmp_path / "d"), "--merge-lora")
    assert rc == 0, err
    done = json.loads((tmp_path / "d" / "export_info.json").read_text())
    assert (done["step"], done["checkpoint"]) == (2, "step-2")
    assert all(torch.equal(_weights(tmp_path / "d")[k], final[k]) for k in final)


def test_export_refusals_come_before_the_model_is_built(runs, cli, tmp_path, monkeypatch):
    from arctic_vl.models.hf import HFModelFactory

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(HFModelFactory, "build", no_build)
    target = tmp_path / "model.bin"
    target.write_text("x")
    rc, _, err = cli("export", str(runs["root"] / "killed"), "--out", str(target))
    assert rc == 2 and f"--out {target}: exists and is not a directory" in err, err
    assert target.read_text() == "x"
    rc, _, err = cli("export", str(runs["root"] / "killed"))
    assert rc == 2 and "--out OUT" in err
    rc, _, err = cli("export", str(runs["root"] / "killed"), "--out", str(runs["root"] / "killed" / "final"))
    assert rc == 2 and "inside the run's final/" in err, err
    # a run directory without weights: exit 2 naming it
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(runs["root"] / "killed" / "config.yaml", empty / "config.yaml")
    rc, _, err = cli("export", str(empty), "--out", str(tmp_path / "x"))
    assert rc == 2 and f"{empty}: no trained weights" in err and "Traceback" not in err, err


def test_merge_lora_is_not_needed_without_lora(tiny_llava, synthetic_data, tmp_path, cli):
    from arctic_vl.engine import Engine

    cfg = _config(tmp_path / "plain", tiny_llava, synthetic_data)
    del cfg["model"]["lora"]
    cfg["trainer"]["max_steps"] = 1
    cfg["eval"] = {}
    Engine(write_yaml(tmp_path / "plain.yaml", cfg)).train()
    final = _weights(tmp_path / "plain" / "final")
    shutil.rmtree(tmp_path / "plain" / "final")  # killed before its export
    rc, _, err = cli("export", str(tmp_path / "plain"), "--out", str(tmp_path / "o"))
    assert rc == 0, err
    got = _weights(tmp_path / "o")  # rebuilt from the step-1 checkpoint: exactly what final/ held
    assert sorted(got) == sorted(final) and all(torch.equal(got[k], final[k]) for k in final)
    assert not (tmp_path / "o" / "adapter").exists()
    assert json.loads((tmp_path / "o" / "export_info.json").read_text())["step"] == 1
    rc, _, err = cli("export", str(tmp_path / "plain"), "--out", str(tmp_path / "o2"), "--merge-lora")
    assert rc == 0 and "nothing to merge" in err, err


def test_newest_weights_without_export_info_or_verified_checkpoints(runs, tmp_path):
    """An export from before export_info.json: final/ unless a checkpoint was written after it. Every checkpoint
    failing verification: final/ when none of them is newer, else the CheckpointError naming them."""
    from arctic_vl import CheckpointError, newest_weights

    for name in ("done", "stale"):
        shutil.copytree(runs["root"] / name, tmp_path / name)  # copy2: the files keep their times
        (tmp_path / name / "final" / "export_info.json").unlink()
    assert newest_weights(tmp_path / "done").path == tmp_path / "done" / "final"
    assert newest_weights(tmp_path / "done").step == 2
    assert newest_weights(tmp_path / "stale").path == tmp_path / "stale" / "checkpoints" / "step-3"
    for name in ("done", "stale"):
        shutil.copy(runs["root"] / name / "final" / "export_info.json", tmp_path / name / "final")
        for ckpt in (tmp_path / name / "checkpoints").iterdir():
            with open(ckpt / "optimizer.pt", "r+b") as fh:  # one flipped byte: fails its manifest
                fh.seek(100)
                byte = fh.read(1)
                fh.seek(100)
                fh.write(bytes([byte[0] ^ 0xFF]))
    from arctic_vl import RunWeights

    assert newest_weights(tmp_path / "done") == RunWeights(tmp_path / "done" / "final", 2, "final", 1)
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        newest_weights(tmp_path / "stale")  # final/ is step 2, a (broken) step-3 is newer: not silently older

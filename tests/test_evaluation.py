"""Evaluation: the same figures on any number of processes, standalone `evaluate` kept apart from training,
callbacks in every entry point, and what a run prints (parameter counts, results, an evaluation bar)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e_utils import read_metrics, subprocess_env, write_eval_file, write_yaml

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------- pure parts
def test_shard_pads_every_rank_to_the_same_count():
    from arctic_vl.trainers.evaluate import shard

    assert shard(5, 0, 2) == [0, 2, 4] and shard(5, 1, 2) == [1, 3, None]
    assert shard(1, 1, 3) == [None] and shard(4, 0, 1) == [0, 1, 2, 3]
    # every sample exactly once over the ranks
    assert sorted(i for r in range(3) for i in shard(7, r, 3) if i is not None) == list(range(7))


def test_counts_merge_by_question_type_whatever_each_rank_saw():
    from arctic_vl.trainers.evaluate import merge_counts

    ranks = [{"colour": [2.0, 3.0]}, {"text": [1.0, 1.0], "count": [0.0, 1.0]}, {}, {"colour": [1.0, 2.0]}]
    assert merge_counts(ranks) == {"colour": [3.0, 5.0], "count": [0.0, 1.0], "text": [1.0, 1.0]}


# ---------------------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def trained(tiny_llava: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two steps with a TensorBoard callback, the vision tower frozen, evaluation with generation after each step."""
    from loguru import logger

    from arctic_vl.engine import Engine

    root = tmp_path_factory.mktemp("evaluation")
    config = write_yaml(root / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava), "freeze": ["vision"]},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                 "eval_sources": [str(write_eval_file(synthetic_data))], "micro_batch_size": 2},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False},
        "eval": {"every_n_steps": 1, "generate": True, "max_samples": 5, "max_new_tokens": 4},
        "callbacks": [{"type": "tensorboard"}],
    })
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="INFO")
    try:
        summary = Engine(config).train()
    finally:
        logger.remove(sink)
    return {"config": config, "out": root / "out", "summary": summary, "messages": messages}


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_standalone_evaluate_records_the_exported_step_apart(trained: dict, capsys):
    """`evaluate` with the README's tensorboard callback: no crash, the step of final/, its own file."""
    from arctic_vl.engine import Engine

    out = trained["out"]
    training_lines = (out / "eval.jsonl").read_text()
    assert [json.loads(x)["step"] for x in training_lines.splitlines()] == [1, 2]
    results = Engine(trained["config"], ["trainer.progress_bar=true"]).evaluate()
    assert results["step"] == 2 and results["model"] == str(out / "final")
    assert (out / "eval.jsonl").read_text() == training_lines, "a standalone evaluation is no training-time one"
    (line,) = [json.loads(x) for x in (out / "eval_standalone.jsonl").read_text().splitlines()]
    assert line["step"] == 2 and line["standalone"] is True
    final = trained["summary"]["eval"]
    # final/ holds exactly the weights evaluated at the end of training
    assert line["eval_loss"] == final["eval_loss"] and line["eval_questions_by_type"] == final["eval_questions_by_type"]
    assert sum(line["eval_questions_by_type"].values()) == line["eval_questions"] == 5
    assert "eval:" in capsys.readouterr().err, "an evaluation progress bar (trainer.progress_bar: true)"

    tb = _scalars(out / "tensorboard")
    assert [s for s, _ in tb["train/loss"]] == [1, 2]
    assert [s for s, _ in tb["eval/eval_loss"]] == [1, 2]
    assert tb["eval_standalone/eval_loss"] == [(2, pytest.approx(line["eval_loss"]))]
    assert tb["eval_standalone/eval_questions_by_type/colour"] == [(2, 3.0)]


def test_the_run_prints_parameter_counts_and_results(trained: dict, capsys):
    from arctic_vl.engine import Engine

    info = json.loads((trained["out"] / "run_info.json").read_text())["parameters"]
    parts = ("vision", "aligner", "llm", "other")
    assert info["total"]["params"] == sum(info[p]["params"] for p in parts) > 0
    assert info["vision"]["trainable"] == 0 < info["vision"]["params"], "model.freeze: [vision]"
    assert info["total"]["trainable"] == info["aligner"]["params"] + info["llm"]["params"]
    from arctic_vl.models.loading import load_model

    assert info["total"]["params"] == sum(p.numel() for p in load_model(trained["out"] / "final").parameters())
    (counts,) = [m for m in trained["messages"] if m.startswith("parameters: ")]
    assert "total" in counts and "vision" in counts and "(0 trainable)" in counts
    done = [m for m in trained["messages"] if m.startswith("evaluation at step ")]
    assert [m.split(":")[0] for m in done] == ["evaluation at step 1", "evaluation at step 2"]
    # a table (issue 19: 13): one aligned `name  value` row each, nested results as outer/inner
    assert re.search(rf"^  eval_loss +{trained['summary']['eval']['eval_loss']:.4f}$", done[-1], re.M)
    assert re.search(r"^  exact_match_by_type/colour +\d", done[-1], re.M)
    # no bar with trainer.progress_bar: false (what the run used)
    Engine(trained["config"]).evaluate()
    assert "eval:" not in capsys.readouterr().err


def test_every_entry_point_works_with_callbacks_configured(trained: dict, tmp_path: Path, cli):
    """export and inspect-data fire no events (they run no training or evaluation) and do not trip on them."""
    rc, _, err = cli("export", str(trained["out"]), "--merge-lora", str(tmp_path / "exported"))
    assert rc == 0, err
    assert (tmp_path / "exported" / "config.json").is_file()
    rc, out, err = cli("inspect-data", str(trained["config"]))
    assert rc == 0, err
    assert "train: 8 samples" in out


# -------------------------------------------------------------------------------------- two processes
def test_two_process_evaluation_equals_one_process(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    """ddp, 2 ranks that see different question types (and a different number of samples): the figures of
    the final evaluation equal a one-process evaluation of the same weights."""
    import subprocess

    from arctic_vl.distributed.deepspeed_backend import free_port
    from arctic_vl.engine import Engine

    config = write_yaml(tmp_path / "ddp.yaml", {
        "model": {"name_or_path": str(tiny_llava)},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:4"}],
                 "eval_sources": [str(write_eval_file(synthetic_data))], "micro_batch_size": 2, "shuffle": False},
        "trainer": {"output_dir": "out", "max_steps": 1, "progress_bar": False},
        "optimizer": {"lr": 1e-2},
        "distributed": {"type": "ddp"},
        "eval": {"generate": True, "max_samples": 5, "max_new_tokens": 4},
    })
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(BIN / "arctic_vl"), str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_metrics(tmp_path / "out")) == 1
    (two,) = [json.loads(x) for x in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    # rank 0 saw colour x3, rank 1 text + count (and a padding sample)
    assert two["eval_questions_by_type"] == {"colour": 3, "count": 1, "text": 1}

    torch.set_num_threads(1)
    one = Engine(config, ["distributed={type: single}"]).evaluate()
    for key in ("eval_label_tokens", "eval_questions", "eval_questions_by_type", "exact_match", "exact_match_by_type"):
        assert two[key] == one[key], key
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6, abs=0)

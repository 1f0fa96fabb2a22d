"""What a run prints (issue 19: 13): step lines with the loss's named components, evaluation results as a short
table, log lines around (never inside) the live progress bar, a warning for a schedule that never reaches its
peak, and numbers as a person reads them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import loguru  # noqa: F401  (imported before any capsys capture)
import pytest
from loguru import logger

from arctic_vl.callbacks.console import format_number
from arctic_vl.trainers.report import MAX_RESULT_ROWS, format_results, format_step_line

#: an SFT trainer whose loss names two side metrics (LossOutput.metrics), as bbu's or GKD's do
HALVES_TRAINER = """
from arctic_vl import TRAINERS, SFTTrainer

@TRAINERS.register("console_halves")
class Halves(SFTTrainer):
    def loss(self, model, batch, counts):
        out = super().loss(model, batch, counts)
        s = float(out.loss_sum.detach())
        out.metrics.update({"half_a": (s / 2, out.count), "noise": (-2.4e-11 * out.count, out.count)})
        return out
"""
exec(compile(HALVES_TRAINER, "halves_trainer", "exec"))


@pytest.mark.parametrize("value, shown", [
    (-2.4e-11, "0"), (-0.0, "0"), (3e-10, "0"), (1.23456, "1.2346"), (-0.5, "-0.5000"), (1.5e-5, "1.500e-05"),
    (-4.2e-4, "-4.200e-04"), (123456.0, "1.235e+05"), (None, "n/a"), (26, "26"), (float("nan"), "nan"),
])
def test_format_number(value, shown):
    assert format_number(value) == shown


def test_step_line_names_the_loss_components():
    metrics = {"loss": 1.23456, "lr": 1e-3, "loss_bbox": 0.4, "loss_giou": 0.3, "kl_loss": -2.4e-11}
    line = format_step_line(10, 100, metrics, ["kl_loss", "loss_bbox", "loss_giou"])
    assert line == "step 10/100 loss 1.2346 (kl_loss 0 loss_bbox 0.4000 loss_giou 0.3000) lr 1.00e-03"
    assert format_step_line(1, 2, {"loss": None, "lr": 0.5}, []) == "step 1/2 loss n/a lr 5.00e-01"


def test_results_are_a_short_aligned_table():
    """A dense-caption-like result (the 1,665-character dict of the issue): nested dicts flattened, lists counted,
    rows aligned and capped, the rest counted."""
    results: dict[str, Any] = {"eval_loss": 0.61234567, "eval_label_tokens": 12000, "box_f1_50": 0.729,
                               "parse_failure_examples": ["{\"object_1\": " * 20, "x", "y"]}
    for geometry in ("bbox_2d", "poly", "line"):
        results[geometry] = {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "tp": 10}
    results["desc"] = {f"type_{i}": i / 7 for i in range(20)}
    text = format_results(results)
    lines = text.splitlines()[1:]
    assert len(lines) == MAX_RESULT_ROWS + 1
    assert lines[0] == "  eval_loss               0.6123"
    assert lines[1] == "  eval_label_tokens       12000"
    assert lines[3] == "  parse_failure_examples  [3 items]"
    assert lines[6] == "  bbox_2d/f1              0.3333"
    assert lines[-1] == f"  ... {3 + 1 + 12 + 20 - MAX_RESULT_ROWS} more in eval.jsonl"
    assert max(len(line) for line in lines) <= 40
    assert format_results({"eval_loss": 1.0}, more_in="eval_standalone.jsonl") == "\n  eval_loss  1.0000"


def _run(tmp_path: Path, tiny_llava: Path, synthetic_data: Path, **trainer: Any) -> tuple[list[str], list[dict]]:
    from arctic_vl import Engine
    from tests.e2e_utils import read_metrics

    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="INFO")
    try:
        Engine({
            "model": {"name_or_path": str(tiny_llava)},
            "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:16"}],
                     "eval_sources": [str(synthetic_data / "heldout.llava.json")], "micro_batch_size": 4,
                     "max_length": 256},
            "trainer": {"output_dir": str(tmp_path / "out"), "seed": 1, **trainer},
            "scheduler": {"type": "cosine", "warmup_steps": 10},
            "eval": {"max_samples": 4},
        }).train()
    finally:
        logger.remove(sink)
    return messages, read_metrics(tmp_path / "out")


def test_without_the_bar_step_lines_show_the_components_and_the_schedule_warns(tmp_path, tiny_llava,
                                                                               synthetic_data):
    """progress_bar off, log_every_n_steps 100 > the run's 3 steps: the first and the last step still print, each
    with the trainer's named side metrics (the values metrics.jsonl holds, the -2.4e-11 noise as 0); a warmup of 10
    steps in a 3-step run never reaches the peak LR: a warning at the start says so, with the highest share."""
    messages, metrics = _run(tmp_path, tiny_llava, synthetic_data, type="console_halves", max_steps=3,
                             progress_bar=False, log_every_n_steps=100)
    steps = [m for m in messages if m.startswith("step ")]
    assert [s.split(" loss")[0] for s in steps] == ["step 1/3", "step 3/3"]
    for line, m in zip(steps, (metrics[0], metrics[2])):
        assert line == (f"step {m['step']}/3 loss {m['loss']:.4f} (half_a {m['half_a']:.4f} noise 0) "
                        f"lr {m['lr']:.2e}")
    assert abs(metrics[0]["half_a"] - metrics[0]["loss"] / 2) < 1e-6
    assert ("the LR schedule never reaches its peak: scheduler.warmup_steps 10 is not below the run's 3 steps, so "
            "the highest LR is 27% of optimizer.lr; lower the warmup or raise trainer.max_steps") in messages
    evaluation = next(m for m in messages if m.startswith("evaluation at step 3:"))
    assert evaluation.splitlines()[1].startswith("  eval_loss  ")


def test_evaluation_line_is_written_around_the_live_bar(tmp_path, tiny_llava, synthetic_data, capsys):
    """With the bar on, the evaluation's lines start on a line of their own: the bar is cleared before them
    (carriage return) and redrawn after, instead of the log text following the bar's."""
    sink = logger.add(lambda m: sys.stderr.write(m), level="INFO", format="{message}")
    try:
        capsys.readouterr()
        _run(tmp_path, tiny_llava, synthetic_data, max_steps=2, progress_bar=True)
        err = capsys.readouterr().err
    finally:
        logger.remove(sink)
    assert "train:" in err and err.count("evaluation at step") == 1
    before = err.split("evaluation at step")[0]
    assert before.endswith("\r"), repr(before[-80:])
    assert before.rstrip("\r").rsplit("\r", 1)[-1].strip() == "", "the bar's line was cleared"
    after = err.split("evaluation at step")[1]
    assert "train:" in after.split("eval_loss", 1)[1], "the bar is drawn again below the table"


# ---------------------------------------------------------------------------------------- issue 19 (15): noise
NOISE = ("Setting accelerator to CPU", "FutureWarning", "is deprecated", "unknown inputs or outputs type",
         "LossOutput", "built successfully")


def test_a_zero3_train_and_a_model_write_print_none_of_deepspeeds_noise(tmp_path, tiny_llava, synthetic_data):
    """A one-process ZeRO-3 train (three steps, an evaluation) and `make-tiny-model`: neither output holds
    DeepSpeed's CPU notice, torch's per-step FutureWarnings for DeepSpeed's collectives, ZeRO-3's warning about a
    LossOutput it cannot look into, nor a shared-memory op build (one process has nothing to share)."""
    from tests.e2e_utils import read_metrics, run_cli, write_yaml

    config = write_yaml(tmp_path / "z3.yaml", {
        "model": {"name_or_path": str(tiny_llava)},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:16"}],
                 "eval_sources": [str(synthetic_data / "heldout.llava.json")], "micro_batch_size": 4,
                 "max_length": 256},
        "trainer": {"output_dir": "out", "max_steps": 3, "progress_bar": False, "seed": 1},
        "eval": {"max_samples": 4},
        "distributed": {"type": "deepspeed", "zero_stage": 3},
    })
    proc = run_cli(str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3]
    assert "step 3/3 loss" in proc.stderr and "evaluation at step 3:" in proc.stderr
    for noise in NOISE:
        assert noise not in proc.stderr and noise not in proc.stdout, noise
    proc = run_cli("make-tiny-model", "qwen2_vl", str(tmp_path / "tiny"), "--layers", "1", "--hidden", "32",
                   "--vision-layers", "1", "--vision-hidden", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Setting accelerator" not in proc.stderr + proc.stdout


def test_the_deepspeed_logger_keeps_every_other_record():
    """The filter drops the CPU notice only: another DeepSpeed warning still reaches its handlers."""
    import logging

    import arctic_vl  # noqa: F401  (installs the filter)

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("DeepSpeed")
    handler = Keep()
    log.addHandler(handler)
    try:
        log.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        log.warning("a real DeepSpeed warning")
    finally:
        log.removeHandler(handler)
    assert seen == ["a real DeepSpeed warning"]


def test_the_shared_memory_op_build_is_announced_only_when_it_will_happen(tmp_path):
    """Several processes on CPU and no cached build: one line says DeepSpeed compiles its op (and where the build is
    kept); with the build cached, nothing; one process: no build at all (the op is switched off)."""
    import deepspeed.ops

    from arctic_vl.distributed.deepspeed_backend import SHM_OP, shared_memory_op_notice

    saved = deepspeed.ops.__compatible_ops__.get(SHM_OP)
    try:
        deepspeed.ops.__compatible_ops__[SHM_OP] = True
        assert shared_memory_op_notice(2, tmp_path) == (
            f"DeepSpeed is compiling its C++ shared-memory collectives op ({SHM_OP}) for CPU: the first start on this "
            f"machine waits a minute or two, silently; later starts reuse the build (in {tmp_path})")
        (tmp_path / SHM_OP).mkdir()
        (tmp_path / SHM_OP / f"{SHM_OP}.so").write_bytes(b"")
        assert shared_memory_op_notice(2, tmp_path) is None
        (tmp_path / SHM_OP / f"{SHM_OP}.so").unlink()
        assert shared_memory_op_notice(1, tmp_path) is None
        assert deepspeed.ops.__compatible_ops__[SHM_OP] is False, "one process builds nothing"
    finally:
        deepspeed.ops.__compatible_ops__[SHM_OP] = saved

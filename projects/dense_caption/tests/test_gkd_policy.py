"""GKD on a tiny Qwen2.5-VL: where each micro-batch's completions come from (TRL's and ms-swift's rule) and its
per-step counts in metrics.jsonl, the divergence at loss_temperature (1 by default, whatever the sampling
temperature), and kl_loss / sft_loss over the eval set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from arctic_vl import IGNORE_INDEX, model_inputs
from tests.e2e_utils import read_metrics

from .conftest import TINY

GAS, STEPS, SEED = 3, 2, 2


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny Qwen2.5-VL (another seed): a teacher that differs from the student."""
    from arctic_vl import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_teacher"), seed=1, **TINY)


def _config(student: Path, teacher: Path, shapes: Path, out: Path, **trainer) -> dict:
    return {
        "model": {"name_or_path": str(student), "freeze": ["vision"]},
        "data": {"type": "dense_caption", "micro_batch_size": 2, "max_length": 256, "num_workers": 0,
                 "sources": [{"path": str(shapes / "train.dense.jsonl"), "sample": f"first:{2 * GAS * STEPS}"}],
                 "eval_sources": [{"path": str(shapes / "heldout.dense.jsonl"), "sample": "first:3"}]},
        "trainer": {"type": "gkd", "output_dir": str(out), "max_steps": STEPS, "gradient_accumulation_steps": GAS,
                    "seed": SEED, "progress_bar": False, "teacher": str(teacher), "beta": 0.5, "sft_alpha": 1.0,
                    "max_completion_length": 3, "prefetch": False, **trainer},
        "optimizer": {"lr": 1e-3}, "checkpoint": {"export_final": False}, "callbacks": [],
        "eval": {"generate": False},
    }


def _student_draws(lmbda: float) -> list[list[bool]]:
    """The draw recomputed on its own: micro-batch m of step s is the student's when u < lmbda, u the first
    uniform of numpy's default_rng seeded by [epoch_seed(seed, s), 0x67B0, m]."""
    from arctic_vl import epoch_seed

    return [[bool(np.random.default_rng([epoch_seed(SEED, s), 0x67B0, m]).random() < lmbda) for m in range(GAS)]
            for s in range(1, STEPS + 1)]


@pytest.mark.parametrize(("lmbda", "seq_kd"), [(0.0, True), (1.0, False), (1.0, True), (0.5, False), (0.5, True),
                                               (0.0, False)])
def test_completion_sources_and_their_counts(lmbda: float, seq_kd: bool, tiny_qwen25: Path, teacher: Path,
                                             shapes: Path, tmp_path: Path) -> None:
    """Student with probability lmbda, else teacher with seq_kd, else the dataset: metrics.jsonl counts the
    step's micro-batches of each source exactly (once, not per process), and they equal the recomputed draw."""
    from arctic_vl import Engine

    Engine(_config(tiny_qwen25, teacher, shapes, tmp_path / "run", lmbda=lmbda, seq_kd=seq_kd)).train()
    lines = read_metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    draws = _student_draws(lmbda)
    if lmbda == 0.5:
        assert 0 < sum(map(sum, draws)) < GAS * STEPS  # both kinds happen: the test tells them apart
    for line, drawn in zip(lines, draws):
        student = sum(drawn)
        got = (line["student_generated"], line["teacher_generated"], line["dataset_completions"])
        assert got == (student, GAS - student if seq_kd else 0, 0 if seq_kd else GAS - student)
    if lmbda == 0.0 and seq_kd:
        assert all(m["teacher_generated"] == GAS for m in lines)
    if lmbda == 1.0:
        assert all(m["student_generated"] == GAS for m in lines)
    if lmbda == 0.0 and not seq_kd:  # the dataset's answers, not generated completions of <= 3 tokens
        assert all(m["dataset_completions"] == GAS and m["label_tokens"] > 2 * GAS * 3 for m in lines)
    else:
        assert all(m["label_tokens"] <= 2 * GAS * 3 for m in lines if m["dataset_completions"] == 0)


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = model_inputs(batch)
    return model(**inputs).logits[:, :-1].float()


def test_divergence_at_loss_temperature_and_eval_kl(tiny_qwen25: Path, teacher: Path, shapes: Path,
                                                    tmp_path: Path) -> None:
    """Sampling temperature 0.9 leaves the divergence at temperature 1 (loss_temperature's default, TRL's and
    ms-swift's); loss_temperature 0.9 changes it. Evaluation reports kl_loss / sft_loss / token_accuracy over
    the eval set's label tokens, equal to the plain forwards' values."""
    from dense_caption.gkd import generalized_jsd_loss, generalized_jsd_per_token
    from loguru import logger

    from arctic_vl import Engine

    engine = Engine(_config(tiny_qwen25, teacher, shapes, tmp_path / "run", temperature=0.9))
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        trainer = engine._build()
    finally:
        logger.remove(sink)
    # a config of the days when `temperature` meant both is told that it now samples only
    assert sum("trainer.temperature 0.9 is the sampling temperature only" in w for w in warnings) == 1
    try:
        trainer.setup()
        assert (trainer.config.temperature, trainer.config.loss_temperature) == (0.9, 1.0)
        steps = trainer.step_batches()
        micro, _ = next(steps)
        steps.close()
        batch, model = micro[0], trainer.bundle.model.eval()
        with torch.no_grad():
            s, t = _logits(model, batch), _logits(trainer.teacher, batch)
            labels = batch["labels"][:, 1:]
            n = int((labels != IGNORE_INDEX).sum())

            def kl_of_loss() -> float:
                out = trainer.loss(model, batch, trainer.local_counts([batch]))
                total, count = out.metrics["kl_loss"]
                assert count == n
                return total / count

            at_one = float(generalized_jsd_loss(s, t, labels, beta=0.5, temperature=1.0))
            at_09 = float(generalized_jsd_loss(s, t, labels, beta=0.5, temperature=0.9))
            assert abs(at_one - at_09) > 1e-3 * at_one  # the two objectives differ: the test tells them apart
            assert kl_of_loss() == pytest.approx(at_one, rel=1e-5)
            trainer.config.loss_temperature = 0.9
            assert kl_of_loss() == pytest.approx(at_09, rel=1e-5)
            trainer.config.loss_temperature = 1.0

            results = trainer.evaluate(model)
            kl = ce = correct = tokens = 0.0
            for i in range(len(trainer.data.eval)):
                one = trainer.data.collate([trainer.data.eval[i]])
                s, t = _logits(model, one), _logits(trainer.teacher, one)
                mask = one["labels"][:, 1:] != IGNORE_INDEX
                targets = one["labels"][:, 1:][mask]
                kl += float(generalized_jsd_per_token(s[mask], t[mask], 0.5, 1.0).sum())
                ce += float(torch.nn.functional.cross_entropy(s[mask], targets, reduction="sum"))
                correct += float((s[mask].argmax(-1) == targets).sum())
                tokens += int(mask.sum())
    finally:
        trainer.dist.teardown()
        engine.release_lock()
    assert len(trainer.data.eval) == 3 and results["eval_label_tokens"] == tokens
    assert results["eval_kl_loss"] == pytest.approx(kl / tokens, rel=1e-5) and kl > 0
    assert results["eval_sft_loss"] == pytest.approx(ce / tokens, rel=1e-5)
    assert results["eval_token_accuracy"] == pytest.approx(correct / tokens, rel=1e-9)
    assert results["eval_loss"] == pytest.approx((kl + ce) / tokens, rel=1e-5)


def test_eval_kl_loss_in_eval_jsonl(tiny_qwen25: Path, teacher: Path, shapes: Path, tmp_path: Path) -> None:
    """A GKD run's final evaluation line carries eval_kl_loss and eval_sft_loss: eval_loss = kl + sft_alpha x sft."""
    from arctic_vl import Engine

    Engine(_config(tiny_qwen25, teacher, shapes, tmp_path / "run", max_steps=1)).train()
    line = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 1 and line["eval_kl_loss"] > 0 and line["eval_sft_loss"] > 0
    assert line["eval_loss"] == pytest.approx(line["eval_kl_loss"] + line["eval_sft_loss"], rel=1e-6)


@pytest.mark.parametrize("name", ["small-cpu-gkd.yaml", "qwen3vl-stage2-gkd.yaml"])
def test_shipped_gkd_recipes_set_loss_temperature_1(name: str) -> None:
    """The shipped recipes train their origin's objective: the divergence at temperature 1, set explicitly."""
    import yaml

    from .conftest import PROJECT

    trainer = yaml.safe_load((PROJECT / "configs" / name).read_text())["trainer"]
    assert trainer["loss_temperature"] == 1.0 and trainer["type"] == "gkd"

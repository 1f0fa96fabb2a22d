"""End to end on a tiny Qwen2.5-VL: augmentation identical across workers and a SIGKILL + resume, dense metrics
from `arctic_vl evaluate`, GKD (KL 0 against itself, student / teacher completions), Stage-A / Stage-B verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arctic_vl import IGNORE_INDEX
from tests.e2e_utils import read_metrics, train_child, write_yaml

from .conftest import TINY

AUGMENTATION = {"enabled": True, "bypass_prob": 0.1, "fill": [245, 245, 245], "ops": [
    {"name": "hflip"}, {"name": "rotate", "params": {"max_deg": 15, "prob": 0.5}}, {"name": "expand_to_fit_affine"},
    {"name": "random_crop", "params": {"size": [0.7, 1.0], "min_coverage": 0.5, "prob": 0.5}},
    {"name": "pad_to_multiple", "params": {"multiple": 16}}, {"name": "brightness", "params": {"prob": 0.5}}]}


def _config(run: Path, shapes: Path, **data) -> dict:
    return {
        "model": {"family": "qwen2_5_vl", "tiny": TINY, "freeze": ["vision"]},
        "data": {"type": "dense_caption", "micro_batch_size": 4, "max_length": 256, "summary_ratio": 0.25,
                 "sources": [{"path": str(shapes / "train.dense.jsonl"), "sample": "first:40"}],
                 "eval_sources": [{"path": str(shapes / "heldout.dense.jsonl"), "sample": "first:4"}],
                 "augmentation": AUGMENTATION, **data},
        "trainer": {"type": "dense_caption", "output_dir": str(run), "max_steps": 4, "seed": 0, "progress_bar": False},
        "optimizer": {"lr": 1e-3}, "checkpoint": {"every_n_steps": 2},
        "eval": {"generate": False},
    }


def _train_runs(shapes: Path, root: Path) -> dict[str, Path]:
    """One run with workers 0; the same with workers 2, killed (SIGKILL) at step 3 and resumed."""
    root.mkdir(parents=True)
    plain = write_yaml(root / "plain.yaml", _config(root / "plain", shapes, num_workers=0))
    killed = write_yaml(root / "killed.yaml", _config(root / "killed", shapes, num_workers=2))
    from arctic_vl import Engine

    Engine(plain).train()  # in this process (the killed run needs its own)
    assert train_child(killed, "kill_step", "3") != 0
    assert (root / "killed" / "checkpoints" / "step-2").is_dir() and not (root / "killed" / "final").exists()
    Engine(killed).train()  # the resume
    return {"plain": root / "plain", "killed": root / "killed", "plain_yaml": plain, "root": root}


def test_end_to_end(shapes: Path, tmp_path: Path, cli_in_process) -> None:
    """One test (its parts share one trained run; split, each pytest-xdist worker would train it again)."""
    runs = _train_runs(shapes, tmp_path / "runs")
    check_augmentation_same_across_workers_and_resume(runs)
    check_evaluate_reports_dense_metrics(runs, cli_in_process)
    check_gkd_against_itself_then_on_policy(runs, shapes)
    check_on_policy_completion_is_the_generators(runs, shapes)
    check_gkd_resume_is_exact(runs, shapes)
    check_stage_a_and_b_end_to_end(runs, shapes, cli_in_process, tmp_path / "stage")


def check_augmentation_same_across_workers_and_resume(runs: dict[str, Path]) -> None:
    a, b = read_metrics(runs["plain"]), read_metrics(runs["killed"])
    assert [m["step"] for m in b] == list(range(1, 5))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert any(m.get("aug_rotate") for m in a) and all("aug_hflip" in m for m in a)
    sa = json.loads((runs["plain"] / "summary.json").read_text())["augmentation"]
    sb = json.loads((runs["killed"] / "summary.json").read_text())["augmentation"]
    assert sa == sb and sa["samples"] == 16 and sa["ops"]["hflip"] > 0
    assert sum(sa["crop_coverage_histogram"].values()) >= sa["dropped_by_crop"]


def check_evaluate_reports_dense_metrics(runs: dict[str, Path], cli_in_process) -> None:
    code, out, err = cli_in_process("evaluate", str(runs["plain_yaml"]), "--set", "eval.generate=true",
                                    "--set", "eval.max_new_tokens=24")
    assert code == 0, err
    results = json.loads(out)
    for key in ("box_f1_50", "json_valid_rate", "f1_50", "desc_exact_match", "parse_failures", "eval_loss"):
        assert key in results
    assert results["answers"] == 4 and results["parse_failures"] == 4 - round(results["json_valid_rate"] * 4)
    # written by the standalone evaluation (never into the training-time eval.jsonl)
    last = json.loads((runs["plain"] / "eval_standalone.jsonl").read_text().splitlines()[-1])
    assert last["standalone"] and {"box_f1_50", "json_valid_rate"} <= set(last)
    assert all("box_f1_50" not in json.loads(x) for x in (runs["plain"] / "eval.jsonl").read_text().splitlines())


def check_gkd_against_itself_then_on_policy(runs: dict[str, Path], shapes: Path) -> None:
    from arctic_vl import Engine

    final = runs["plain"] / "final"
    cfg = _config(runs["root"] / "gkd", shapes, augmentation={"enabled": False})
    cfg["model"] = {"name_or_path": str(final), "freeze": ["vision"]}
    cfg["trainer"].update(type="gkd", max_steps=2, beta=0.5, sft_alpha=1.0)
    cfg["eval"] = {"generate": False}
    Engine(cfg).train()
    first = read_metrics(runs["root"] / "gkd")[0]
    assert first["kl_loss"] == pytest.approx(0.0, abs=1e-6)  # the teacher (default: the base, final/) is the student
    assert first["loss"] == pytest.approx(first["kl_loss"] + first["sft_loss"], rel=1e-6)
    assert 0 <= first["token_accuracy"] <= 1
    cfg["trainer"].update(output_dir=str(runs["root"] / "gkd_on"), lmbda=1.0, max_completion_length=6)
    summary = Engine(cfg).train()
    assert summary["teacher"] == str(final)
    on = read_metrics(runs["root"] / "gkd_on")
    assert [(m["student_generated"], m["teacher_generated"], m["dataset_completions"]) for m in on] == [(1, 0, 0)] * 2
    assert all(m["kl_loss"] >= 0 and m["label_tokens"] <= 4 * 6 for m in on)  # completions of <= 6 tokens


def _gkd_config(runs: dict[str, Path], shapes: Path, name: str, **trainer) -> dict:
    """GKD of the trained tiny model (student: final/) from its random initialisation (teacher: base_model/)."""
    cfg = _config(runs["root"] / name, shapes, augmentation={"enabled": False})
    cfg["model"] = {"name_or_path": str(runs["plain"] / "final"), "freeze": ["vision"]}
    cfg["trainer"].update(type="gkd", teacher=str(runs["plain"] / "base_model"), beta=0.5, sft_alpha=1.0, **trainer)
    return cfg


def check_on_policy_completion_is_the_generators(runs: dict[str, Path], shapes: Path) -> None:
    """lmbda 1: the training step trains on the student's own completion of each prompt, with or without seq_kd
    (TRL's and ms-swift's rule: the student's draw comes first); lmbda 0 with seq_kd: on the teacher's.

    At temperature 1e-4 sampling is the greedy choice, so the expected completion is a plain greedy `generate`
    of the item's prompt, built on its own from the dataset (not sliced out of the batch as the trainer does)."""
    from dense_caption.evaluation import generate

    from arctic_vl import Engine

    trained = {}
    for lmbda, seq_kd, source in ((1.0, False, "student"), (1.0, True, "student"), (0.0, True, "teacher")):
        cfg = _gkd_config(runs, shapes, f"gkd_policy_{lmbda}_{seq_kd}", lmbda=lmbda, seq_kd=seq_kd,
                          temperature=1e-4, max_completion_length=5)
        engine = Engine(cfg)
        trainer = engine._build()
        trainer.setup()
        steps = trainer.step_batches()
        micro, data_time = next(steps)
        tok = trainer.bundle.processor.tokenizer
        generator = trainer.teacher if source == "teacher" else trainer.bundle.model
        expected = []
        for i in micro[0]["_indices"]:
            item, _ = trainer.data.train.prompt_item(i)
            expected.append(generate(generator.eval(), trainer.data.collate([item]), tok, 5))
        starts = [int((label != IGNORE_INDEX).nonzero()[0]) for label in micro[0]["labels"]]
        prompts = [row[:start].clone() for row, start in zip(micro[0]["input_ids"], starts)]
        metrics = trainer.train_step(micro, data_time)
        steps.close()
        trainer.dist.teardown()
        engine.release_lock()
        batch = micro[0]
        assert metrics[f"{source}_generated"] == 1 and metrics["dataset_completions"] == 0
        got = [batch["labels"][r][batch["labels"][r] != IGNORE_INDEX].tolist() for r in range(len(expected))]
        assert got == expected
        assert metrics["label_tokens"] == sum(len(e) for e in expected)
        for r, (start, completion) in enumerate(zip(starts, expected)):  # the prompt, then the completion
            assert batch["input_ids"][r][:start].tolist() == prompts[r].tolist()
            assert batch["input_ids"][r][start:start + len(completion)].tolist() == completion
        trained[lmbda, seq_kd] = got
    assert trained[1.0, False] == trained[1.0, True]
    assert trained[1.0, True] != trained[0.0, True]  # student and teacher answer differently: the test tells them apart


def check_gkd_resume_is_exact(runs: dict[str, Path], shapes: Path) -> None:
    """lmbda 0.5: a run cut after its step-2 checkpoint (steps 3-4, their checkpoint and export removed: what a
    SIGKILL at step 4 leaves) and resumed redraws the same on-policy steps and samples the same completions, so
    its per-step losses equal the uninterrupted run's. (The SIGKILL itself is the SFT check's; here what matters
    is that the draws and samples depend on (seed, step) and the weights only, not on the process's RNG state.)"""
    import shutil

    from arctic_vl import Engine

    cfg = _gkd_config(runs, shapes, "gkd_resume", lmbda=0.5, max_completion_length=6, max_steps=4)
    Engine(cfg).train()
    run = runs["root"] / "gkd_resume"
    straight = read_metrics(run)
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "final")
    summary = Engine(cfg).train()  # resumes from step-2
    resumed = read_metrics(run)
    assert summary["steps"] == 4 and [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["student_generated"] for m in straight] == [0, 1, 1, 1]  # both kinds, seeded by (seed, step)
    assert [m["dataset_completions"] for m in straight] == [1, 0, 0, 0]
    assert [m["student_generated"] for m in resumed] == [0, 1, 1, 1]
    for key in ("loss", "kl_loss", "sft_loss", "label_tokens", "grad_norm"):
        assert [m[key] for m in straight] == [m[key] for m in resumed], key


def check_stage_a_and_b_end_to_end(runs: dict[str, Path], shapes: Path, cli_in_process, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True)
    code, out, err = cli_in_process("dense-caption", "make-stage-data", str(shapes / "heldout.dense.jsonl"),
                                    "--out-dir", str(tmp_path), "--group-size", "2")
    assert code == 0, err
    made = json.loads(out)
    lines = (tmp_path / "groups.jsonl").read_text().splitlines()
    assert len(lines) == made["groups"] == made.get("pass", 0) + made.get("fail", 0)
    (tmp_path / "few.jsonl").write_text("\n".join(lines[:2]) + "\n")
    summaries, verdicts = tmp_path / "summaries.jsonl", tmp_path / "verdicts.jsonl"
    code, out, err = cli_in_process("dense-caption", "stage-a", str(runs["plain_yaml"]), "--images",
                                    str(tmp_path / "few.jsonl"), "--out", str(summaries), "--max-new-tokens", "12")
    assert code == 0, err
    report = json.loads(out)
    rows = [json.loads(x) for x in summaries.read_text().splitlines()]
    assert report["images"] == len(rows) == 4 and [r["index"] for r in rows] == [0, 1, 0, 1]
    assert report.get("summaries", 0) + sum(report["errors"].values()) == 4
    assert all((r["summary"] is None) == ("error" in r) for r in rows)
    code, out, err = cli_in_process("dense-caption", "stage-b", str(runs["plain_yaml"]), "--summaries", str(summaries),
                                    "--out", str(verdicts), "--max-retries", "1", "--max-new-tokens", "12")
    assert code == 0, err
    report = json.loads(out)
    rows = [json.loads(x) for x in verdicts.read_text().splitlines()]
    assert len(rows) == report["groups"] == 2
    for r in rows:
        assert r["verdict"] in ("pass", "fail", None)
        assert r["verdict"] is not None or "error" in r
        assert r["attempts"] <= 2


def test_bad_records_and_verbs_exit_2(shapes: Path, cli_in_process, tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "run.yaml", _config(tmp_path / "run", shapes))
    code, _, err = cli_in_process("dense-caption", "stage-a", str(config), "--images",
                                  str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "o.jsonl"))
    assert code == 2 and "not a directory, an image" in err
    code, _, err = cli_in_process("dense-caption", "stage-a", str(config), "--images", str(shapes / "images"),
                                  "--out", str(tmp_path / "o.jsonl"))
    assert code == 2 and f"{tmp_path / 'run'}: no trained weights" in err


def test_core_inspect_data_shows_the_built_items(shapes: Path, cli_in_process, tmp_path: Path) -> None:
    """The core's inspect-data builds this factory's items (the former `dense-caption inspect`): augmented,
    answered in the family's coordinates (Qwen2.5-VL: pixels, the geometry key first), encoded."""
    import json
    import re

    config = write_yaml(tmp_path / "run.yaml", _config(tmp_path / "run", shapes, summary_ratio=0.0))
    code, out, err = cli_in_process("inspect-data", str(config), "--n", "2")
    assert code == 0, err
    assert out.count("\n--- ") == 2 and "augmentation {" in out
    records = [json.loads(x) for x in (shapes / "train.dense.jsonl").read_text().splitlines()]
    for block in out.split("\n--- ")[1:]:
        index = int(re.search(r"record (\d+)(?: \(line \d+\))?: \d+ tokens", block).group(1))
        objects = json.loads(re.search(r"\[\[(.*)<\|im_end\|>\]\]", block, re.S).group(1))
        rec = records[index]
        assert objects and all(next(iter(o)) != "desc" for o in objects)
        for o in objects:  # pixels of the 64 x 64 image (norm1000 would exceed it)
            assert all(0 <= v <= max(rec["width"], rec["height"]) for v in next(iter(o.values())))
    code, _, err = cli_in_process("dense-caption", "inspect", str(config))
    assert code == 2 and "invalid choice: 'inspect'" in err

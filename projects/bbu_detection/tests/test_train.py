"""End to end on a tiny Qwen2.5-VL.

Train, metrics, export reload, evaluate, predict, groups, NaN guard, freeze, resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from bbu_detection.trainer import DetectionTrainer
from safetensors.torch import load_file

from tests.e2e_utils import read_metrics, train_child, write_yaml

GROUPS = [{"name": p, "parts": [p]} for p in ("vision", "aligner", "llm", "detection", "adapter")]


def run(cli: Any, *args: Any) -> tuple[int, str, str]:
    """The core's in-process CLI fixture with every argument as a string."""
    return cli(*(str(a) for a in args))


def config(run_dir: Path, data: Path, **trainer: Any) -> dict[str, Any]:
    """A 4-step run: 24 records, micro-batch 4, the five parameter groups, checkpoints every 2 steps."""
    return {
        "model": {"type": "bbu_detection", "family": "qwen2_5_vl",
                  "detection": {"num_queries": 6, "decoder_layers": 2, "caption_layers": 1, "d_model": 32,
                                "heads": 4, "max_caption_tokens": 6}},
        "data": {"type": "bbu_detection", "sources": [str(data / "train.bbu.jsonl")],
                 "eval_sources": [str(data / "heldout.bbu.jsonl")], "micro_batch_size": 4},
        "trainer": {"type": "bbu_detection", "output_dir": str(run_dir / "out"), "max_steps": 4, "seed": 3,
                    "progress_bar": False, "group_grad_norms": True, **trainer},
        "optimizer": {"lr": 2e-3, "param_groups": GROUPS},
        "scheduler": {"type": "constant"},
        "checkpoint": {"every_n_steps": 2, "keep_last": None},
    }


@pytest.fixture(scope="module")
def trained(bbu_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """(config file, run dir, the trainer after training) of the reference run."""
    from arctic_vl import Engine

    d = tmp_path_factory.mktemp("bbu_train")
    path = write_yaml(d / "run.yaml", config(d, bbu_data))
    seen: dict[str, Any] = {}
    real_finish = DetectionTrainer.finish

    def finish(self: DetectionTrainer) -> dict[str, Any]:
        seen["trainer"] = self
        return real_finish(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DetectionTrainer, "finish", finish)
        Engine(path).train()
    return path, d / "out", seen["trainer"]


def test_metrics_and_eval(trained):
    _, out, _ = trained
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        for key in ("teacher_lm_loss", "student_lm_loss", "loss_bbox", "loss_giou", "loss_objectness", "loss_caption"):
            assert isinstance(m[key], float) and m[key] >= 0, key
        assert {f"grad_norm/{g['name']}" for g in GROUPS} <= set(m)
        assert m["nan_skips"] == 0
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 4
    assert {"eval_loss", "AP", "AP50", "AP75", "AR100", "caption_exact_match"} <= set(evals[-1])
    assert evals[-1]["eval_images"] == 8 and evals[-1]["eval_objects"] > 0


def _batch(trainer: Any) -> dict[str, Any]:
    return trainer.to_device(trainer.data.collate([trainer.data.eval[i] for i in range(3)]))


def test_export_reloads_with_transformers_and_the_plugin(trained):
    from bbu_detection import load_detection_model
    from bbu_detection.forward import pair_forward
    from transformers import AutoModelForImageTextToText

    from arctic_vl import model_inputs

    _, out, trainer = trained
    final = out / "final"
    saved = load_file(str(final / "model.safetensors"))
    assert not any("detection_head" in k for k in saved), "final/ is a plain HF VLM"
    live = trainer.bundle.model.eval()
    batch = _batch(trainer)
    plain = AutoModelForImageTextToText.from_pretrained(final).eval()
    with torch.no_grad():
        want = live.vlm(**model_inputs(batch)).logits
        got = plain(**model_inputs(batch)).logits
    assert torch.allclose(got, want, atol=1e-5)
    item = trainer.data.eval[0]  # the first sample alone, cut where its student answer begins
    start = int((item["_spans"] == 2).nonzero()[0])  # the student span
    item.update(input_ids=item["input_ids"][:start], labels=item["labels"][:start], _spans=item["_spans"][:start])
    prompt = model_inputs(trainer.to_device(trainer.data.collate([item])))
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(plain.generate(**prompt, **kwargs), live.vlm.generate(**prompt, **kwargs))
    pair, _ = load_detection_model(final)
    with torch.no_grad():
        a, b = pair_forward(live, batch, trainer.image_token_id), pair_forward(pair, batch, trainer.image_token_id)
    assert torch.allclose(a.detection.boxes, b.detection.boxes, atol=1e-5)
    assert torch.allclose(a.detection.logits, b.detection.logits, atol=1e-5)


def test_evaluate_cli_reports_coco_metrics(trained, cli):
    path, out, _ = trained
    code, stdout, err = run(cli, "evaluate", path)
    assert code == 0, err
    results = json.loads(stdout)
    last = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    for key in ("AP", "AP50", "AP75", "AR100", "caption_exact_match"):
        assert results[key] == pytest.approx(last[key], abs=1e-9), key  # the export is the trained model
    code, stdout, err = run(cli, "inspect-data", path)
    assert code == 0, err
    assert "train: 24 samples (24 with images" in stdout and "<|im_start|>assistant\n[[" in stdout


def test_predict_cli(trained, bbu_data, cli, tmp_path):
    path, _, _ = trained
    images = sorted((bbu_data / "shapes" / "images").glob("heldout-*.png"))[:3]
    code, _, err = run(cli, "predict", path, "--images", *images, "--out", tmp_path / "p.jsonl",
                       "--score-threshold", "0")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert len(r["objects"]) == 6  # threshold 0: every query
        scores = [o["score"] for o in r["objects"]]
        assert scores == sorted(scores, reverse=True)
        for o in r["objects"]:
            x1, y1, x2, y2 = o["bbox_2d"]
            assert 0 <= x1 <= x2 <= r["width"] and 0 <= y1 <= y2 <= r["height"] and isinstance(o["desc"], str)
    code, _, _ = run(cli, "predict", path, "--images", images[0], "--out", tmp_path / "q.jsonl",
                     "--score-threshold", "1")
    assert code == 0 and json.loads((tmp_path / "q.jsonl").read_text())["objects"] == []
    code, _, err = run(cli, "predict", path, "--images", tmp_path / "nope.png", "--out", tmp_path / "r.jsonl")
    assert code == 2 and "nope.png is neither an image file nor a directory" in err
    # issue 24 item 6: Qwen refuses a 1x300 image in the token count: named (exit 2), never a ValueError
    from PIL import Image

    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 300)).save(thin)
    code, _, err = run(cli, "predict", path, "--images", images[0], thin, "--out", tmp_path / "s.jsonl")
    assert code == 2 and "Traceback" not in err, err
    assert f"--images: no prediction for {thin}" in err and "unreadable_image" in err and "aspect ratio" in err, err
    code, _, err = run(cli, "predict", path, "--images", thin, "--out", tmp_path / "s.jsonl")
    assert code == 2 and f"--images: no image can be used (record 0 = {thin.resolve()})" in err, err


def test_parameter_outside_the_groups_exits_2(bbu_data, tmp_path, cli):
    cfg = config(tmp_path, bbu_data)
    cfg["optimizer"]["param_groups"] = [g for g in GROUPS if g["name"] != "adapter"]
    code, _, err = run(cli, write_yaml(tmp_path / "run.yaml", cfg))
    assert code == 2, err[-3000:]
    assert "match no group" in err and "detection_head.language_adapter" in err and "Traceback" not in err


def test_bad_record_exits_2_naming_file_record_and_field(bbu_data, tmp_path, cli):
    lines = (bbu_data / "train.bbu.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    bad["objects"][0]["bbox_2d"] = [5, 5, 500, 20]
    bad["images"] = [str(bbu_data / p) for p in bad["images"]]
    data = tmp_path / "bad.jsonl"
    data.write_text(lines[0].replace('"shapes/', f'"{bbu_data}/shapes/') + "\n" + json.dumps(bad) + "\n")
    cfg = config(tmp_path, bbu_data)
    cfg["data"].update(sources=[str(data)], eval_sources=[])
    code, _, err = run(cli, write_yaml(tmp_path / "run.yaml", cfg))
    assert code == 2 and "Traceback" not in err
    assert f"{data}: record 1 (line 2): field objects[0].bbox_2d" in err and "geometry_out_of_range" in err
    cfg["data"]["on_bad_record"] = "skip"
    cfg["trainer"]["max_steps"] = 1
    code, stdout, err = run(cli, write_yaml(tmp_path / "skip.yaml", cfg))
    assert code == 0, err
    assert json.loads(stdout[stdout.index("{"):])["skipped_records"] == {"geometry_out_of_range": 1}


def test_nan_guard_skips_the_step_and_keeps_the_weights(bbu_data, tmp_path, monkeypatch):
    from arctic_vl import Engine

    real_loss = DetectionTrainer.loss

    def loss(self: DetectionTrainer, model: Any, batch: Any, counts: Any) -> Any:
        out = real_loss(self, model, batch, counts)
        if self.state.step == 1 and model.training:  # the second optimizer step
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(DetectionTrainer, "loss", loss)
    cfg = config(tmp_path, bbu_data, max_steps=3)
    cfg["checkpoint"]["every_n_steps"] = 1
    cfg["data"]["eval_sources"] = []
    Engine(write_yaml(tmp_path / "run.yaml", cfg)).train()
    ckpt = tmp_path / "out" / "checkpoints"
    w1, w2, w3 = (load_file(str(ckpt / f"step-{s}" / "model.safetensors")) for s in (1, 2, 3))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), "the NaN step changed weights"
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)
    m = read_metrics(tmp_path / "out")
    assert m[1]["skipped"] is True and m[1]["nan_skips"] == 1 and m[1]["loss"] is None
    assert m[2]["nan_skips"] == 1 and "skipped" not in m[2]
    assert m[2]["lr"] == pytest.approx(m[0]["lr"] * 0.5)  # the LR was lowered


def test_detection_freeze_epochs(bbu_data, tmp_path):
    from bbu_detection.head import DetectionHead

    from arctic_vl import Engine

    cfg = config(tmp_path, bbu_data, max_steps=8, detection_freeze_epochs=1)  # 6 steps an epoch
    cfg["checkpoint"]["every_n_steps"] = 1
    cfg["data"]["eval_sources"] = []
    Engine(write_yaml(tmp_path / "run.yaml", cfg)).train()
    ckpt = tmp_path / "out" / "checkpoints"
    w = {s: load_file(str(ckpt / f"step-{s}" / "model.safetensors")) for s in (1, 6, 7)}
    head = [k for k in w[1] if k.startswith("model.detection_head.")]
    vlm = [k for k in w[1] if k.startswith("model.vlm.")]
    torch.manual_seed(3)
    initial = DetectionHead(json_config(tmp_path / "out" / "final")).state_dict()
    assert all(torch.equal(w[6][k], initial[k[len("model.detection_head."):]]) for k in head), (
        "head trained while frozen"
    )
    assert any(not torch.equal(w[1][k], w[6][k]) for k in vlm), "the VLM trains during the freeze"
    assert any(not torch.equal(w[6][k], w[7][k]) for k in head), "the head trains after the freeze"
    m = read_metrics(tmp_path / "out")
    assert [x["epoch"] for x in m] == [0] * 6 + [1] * 2
    assert all(x["grad_norm/detection"] == 0.0 and x["grad_norm/adapter"] == 0.0 for x in m[:6])
    assert m[6]["grad_norm/detection"] > 0


#: the documents' schedule (issue 19 item 5): the vision tower frozen for epoch 0 (steps 1-6 of 6 an epoch),
#: the LLM's LR / 10 for the last 25% of the 8 steps (steps 7 and 8)
PHASES = [{"parts": ["vision"], "until_epoch": 1, "lr_factor": 0}, {"parts": ["llm"], "from": 0.75, "lr_factor": 0.1}]


def test_phases_unfreeze_and_cut_the_lr_and_resume_exactly_across_the_boundary(bbu_data, tmp_path):
    from arctic_vl import Engine

    def phased(name: str) -> Path:
        cfg = config(tmp_path / name, bbu_data, max_steps=8, weight_norms=True)
        cfg["scheduler"]["phases"] = PHASES
        cfg["data"]["eval_sources"] = []
        cfg["checkpoint"].update(export_final=False)
        (tmp_path / name).mkdir()
        return write_yaml(tmp_path / name / "run.yaml", cfg)

    reference = phased("reference")
    Engine(reference).train()
    want = read_metrics(tmp_path / "reference" / "out")
    assert [m["lr/vision"] for m in want] == [0.0] * 6 + [2e-3] * 2
    assert [m["lr/llm"] for m in want] == pytest.approx([2e-3] * 6 + [2e-4] * 2)
    assert all(m["lr/detection"] == m["lr/adapter"] == m["lr/aligner"] == 2e-3 for m in want)
    vision = [m["weight_norm/vision"] for m in want]
    assert vision[:6] == [vision[0]] * 6 and vision[6] != vision[5], "vision frozen in epoch 0, trained after"
    assert len({m["weight_norm/llm"] for m in want}) == 8

    killed = phased("killed")  # checkpoints at steps 2 and 4: killed at 5, resumed from 4 across both boundaries
    assert train_child(killed, "kill_step", "5") == -9
    Engine(killed).train()
    got = read_metrics(tmp_path / "killed" / "out")
    assert [m["step"] for m in got] == list(range(1, 9))
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "loss_bbox", "loss_caption", "student_lm_loss", "lr/vision", "lr/llm",
                    "weight_norm/vision", "weight_norm/llm", "grad_norm/vision"):
            assert a[key] == b[key], (a["step"], key)


def test_tied_caption_head_is_smaller_trains_saves_and_reloads(bbu_data, tmp_path):
    """`model.detection.tie_caption_embeddings` (issue 19 item 8): the caption decoder reads and predicts through
    the LM's embedding and output layer: vocab x d_model x 2 (+ the output bias) fewer parameters, 2 x D x d_model
    more (the projections); it trains, and the export reloads with equal caption logits."""
    from bbu_detection import load_detection_model
    from bbu_detection.forward import pair_forward
    from bbu_detection.head import DetectionHead
    from loguru import logger

    from arctic_vl import Engine

    cfg = config(tmp_path, bbu_data, max_steps=2)
    cfg["model"]["detection"]["tie_caption_embeddings"] = True
    cfg["data"]["eval_sources"] = []
    cfg["checkpoint"]["every_n_steps"] = None
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    seen: dict[str, Any] = {}
    real_finish = DetectionTrainer.finish

    def finish(self: DetectionTrainer) -> dict[str, Any]:
        seen["trainer"] = self
        return real_finish(self)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DetectionTrainer, "finish", finish)
            Engine(write_yaml(tmp_path / "run.yaml", cfg)).train()
    finally:
        logger.remove(sink)
    trainer = seen["trainer"]
    tied = trainer.bundle.model.detection_head
    c = tied.config
    untied = DetectionHead(c.model_copy(update={"tie_caption_embeddings": False}))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    v, d, hidden = c.vocab_size, c.d_model, c.hidden_size
    assert count(untied) - count(tied) == 2 * v * d + v - 2 * hidden * d
    report = [x.strip() for x in lines if x.startswith("detection head: ")]
    assert report == [f"detection head: {count(tied):,} parameters; caption decoder {count(tied.captioner):,}, "
                      "vocabulary tied to the language model's embedding and output layer (tie_caption_embeddings)"]
    # the caption loss reaches the LM's embedding (the tie is real), and it learns
    m = read_metrics(tmp_path / "out")
    assert all(x["loss_caption"] > 0 for x in m)
    vlm = trainer.bundle.model.vlm
    assert tied.captioner.lm_modules == [vlm.get_input_embeddings(), vlm.get_output_embeddings()]
    assert not any(k.startswith(("captioner.embed.", "captioner.head.")) for k in tied.state_dict())
    pair, _ = load_detection_model(tmp_path / "out" / "final")
    batch = trainer.to_device(trainer.data.collate([trainer.data.train[i] for i in range(3)]))
    live = trainer.bundle.model.eval()
    with torch.no_grad():
        outs = [pair_forward(m_, batch, trainer.image_token_id) for m_ in (live, pair)]
        ids = torch.tensor([[c.caption_end_id, 3, 4]])
        rows = torch.zeros(1, dtype=torch.long)
        logits = [m_.detection_head.caption_logits(o.detection.states[-1][0, :1], ids,
                                                   o.detection.caption_context(rows, rows))
                  for m_, o in zip((live, pair), outs)]
    assert logits[0].shape[-1] == v and torch.allclose(logits[0], logits[1], atol=1e-5)


def json_config(final: Path) -> Any:
    from bbu_detection.head import read_head_config

    return read_head_config(final / "detection_head")


def test_sigkill_and_rerun_is_exact(trained, bbu_data, tmp_path):
    from arctic_vl import Engine

    _, reference_dir, _ = trained
    path = write_yaml(tmp_path / "run.yaml", config(tmp_path, bbu_data))
    assert train_child(path, "kill_step", "3") == -9
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2, 3]
    Engine(path).train()
    got, want = read_metrics(tmp_path / "out"), read_metrics(reference_dir)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "loss_bbox", "loss_caption", "student_lm_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=1e-6), (a["step"], key)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_qwen_families_train_and_export(family, bbu_data, tmp_path):
    from bbu_detection import load_detection_model

    from arctic_vl import Engine

    cfg = config(tmp_path, bbu_data, max_steps=2)
    cfg["model"]["family"] = family
    cfg["data"]["eval_sources"] = []
    cfg["checkpoint"]["every_n_steps"] = None
    Engine(write_yaml(tmp_path / "run.yaml", cfg)).train()
    m = read_metrics(tmp_path / "out")
    assert len(m) == 2 and all(x["loss_bbox"] > 0 and x["student_lm_loss"] > 0 for x in m)
    model, _ = load_detection_model(tmp_path / "out" / "final")
    assert type(model.vlm).__name__.lower().startswith(family.replace("_", ""))


def test_validate_refuses_a_llava_model(tmp_path, cli, bbu_data):
    cfg = config(tmp_path, bbu_data)
    cfg["model"]["family"] = "llava_next"
    code, _, err = run(cli, "validate", write_yaml(tmp_path / "run.yaml", cfg))
    assert code == 2
    assert "'llava_next' is not supported by bbu_detection; allowed: qwen2_5_vl, qwen2_vl, qwen3_vl" in err


@pytest.mark.parametrize("name", ["small-cpu.yaml", "qwen2_5_vl-local.yaml"])
def test_shipped_configs_validate(name, tiny_qwen25, cli, tmp_path):
    overrides = ["--set", f"model.name_or_path={tiny_qwen25}"] if name.startswith("qwen") else []
    for split in ("train", "heldout"):  # the README's data step writes these
        (tmp_path / f"{split}.bbu.jsonl").write_text("")
    overrides += ["--set", f"data.sources=[{tmp_path / 'train.bbu.jsonl'}]",
                  "--set", f"data.eval_sources=[{tmp_path / 'heldout.bbu.jsonl'}]"]
    code, out, err = run(cli, "validate", Path(__file__).parents[1] / "configs" / name, *overrides)
    assert code == 0, err
    assert "# model: bbu_detection:" in out


def test_predict_of_a_killed_run_uses_its_latest_checkpoint(trained, bbu_data, cli, tmp_path):
    """No final/ (killed before its export): the step-4 checkpoint on the rebuilt model predicts exactly what the
    finished run's final/ predicts; the weights are logged with their step. No weights at all: exit 2."""
    import shutil

    import yaml
    from loguru import logger

    path, out, _ = trained
    images = sorted((bbu_data / "shapes" / "images").glob("heldout-*.png"))[:2]
    code, _, err = run(cli, "predict", path, "--images", *images, "--out", tmp_path / "final.jsonl",
                       "--score-threshold", "0")
    assert code == 0, err
    killed = tmp_path / "killed"
    shutil.copytree(out, killed, ignore=shutil.ignore_patterns("final"))
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["output_dir"] = str(killed)
    killed_yaml = write_yaml(tmp_path / "killed.yaml", cfg)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        code, _, err = run(cli, "predict", killed_yaml, "--images", *images, "--out", tmp_path / "killed.jsonl",
                           "--score-threshold", "0")
    finally:
        logger.remove(sink)
    assert code == 0, err
    assert f"weights: checkpoint {killed / 'checkpoints' / 'step-4'} (step 4)" in "\n".join(lines)
    assert (tmp_path / "killed.jsonl").read_text() == (tmp_path / "final.jsonl").read_text()
    cfg["trainer"]["output_dir"] = str(tmp_path / "never_trained")
    code, _, err = run(cli, "predict", write_yaml(tmp_path / "none.yaml", cfg), "--images", images[0],
                       "--out", tmp_path / "none.jsonl")
    assert code == 2 and f"{tmp_path / 'never_trained'}: no trained weights" in err, err

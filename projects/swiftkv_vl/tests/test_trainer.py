"""The swiftkv_vl trainer's loss equals a hand computation, and training changes only the SwiftKV parameters.

One optimizer step over 2 micro-batches of different token counts (an image + a text-only sample, then two
text-only samples) with sample weights, temperature and an MSE term: the loss the loop logs must equal the
DESIGN.md formula computed here independently, from full logits of the composite's ordinary forward.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from arctic_vl import IGNORE_INDEX, model_inputs
from tests import e2e_utils
from tests.e2e_utils import read_metrics, subprocess_env

synthetic_data = e2e_utils.synthetic_data  # a session fixture shared with the core's tests

torch.set_num_threads(1)

TEMPERATURE, MULT, W_IMAGE, W_TEXT = 2.0, 3.0, 2.0, 0.5


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-NeXT teacher with sharpened logits and spread K/V weights, so student and teacher differ
    clearly at init (a freshly initialised tiny model is nearly uniform: its KL would be ~1e-4)."""
    from arctic_vl import make_tiny_model

    out = make_tiny_model("llava_next", tmp_path_factory.mktemp("teacher"), seed=3, text_layers=4, hidden=64,
                          heads=2, kv_heads=1, intermediate=128)
    weights = load_file(str(out / "model.safetensors"))
    for name in weights:
        if name.endswith("lm_head.weight"):  # saved under the legacy `language_model.` prefix
            weights[name] = weights[name] * 200
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            weights[name] = weights[name] * 15
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def run(teacher: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Write 4 records (image, image | text, text), train 2 steps of 2 micro-batches, return (config, metrics)."""
    d = tmp_path_factory.mktemp("run")
    records = json.loads((synthetic_data / "train.llava.json").read_text())
    image = [r for r in records if "image" in r][:2]
    text = [r for r in records if "image" not in r][:2]
    for r in image:
        r["image"] = str(synthetic_data / r["image"])
    # shuffle: false trains file order; micro-batches of unlike token counts tell the normalisations apart
    (d / "four.json").write_text(json.dumps([image[0], image[1], text[0], text[1]]))
    config = d / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"type": "swiftkv_vl", "teacher": str(teacher), "num_key_value_layers": 2},
        "data": {"sources": ["four.json"], "micro_batch_size": 2, "shuffle": False},
        "trainer": {"type": "swiftkv_vl", "output_dir": "out", "max_steps": 2, "gradient_accumulation_steps": 2,
                    "temperature": TEMPERATURE, "hidden_loss_mult": MULT, "hidden_loss_layer": -1,
                    "vision_loss_weight": W_IMAGE, "text_loss_weight": W_TEXT, "progress_bar": False,
                    "loss_chunk_size": 16},
        "optimizer": {"lr": 2e-3},
        "scheduler": {"type": "constant"},
    }, sort_keys=False))
    from arctic_vl import Engine

    Engine(config).train()
    return config, read_metrics(d / "out")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hand_loss(config: Path) -> dict[str, float]:
    """DESIGN.md's loss for step 1 from scratch: full logits, F.kl_div, explicit masks and normalisers."""
    from arctic_vl import DATA, MODELS, load_config

    cfg = load_config(config)
    bundle = MODELS.get("swiftkv_vl")(cfg.model, cfg).build()
    data = DATA.get("vlm")(cfg.data, cfg).build(bundle, seed=cfg.trainer.seed)
    model = bundle.model.eval()
    import swiftkv_vl

    image_id = bundle.processor.image_token_id
    kl_sums, mse_sums = {"image": 0.0, "text": 0.0}, {"image": 0.0, "text": 0.0}
    n_label, n_hidden = {"image": 0, "text": 0}, {"image": 0, "text": 0}
    micro_token_counts, per_micro = [], []
    ce = {"student": 0.0, "teacher": 0.0}
    for indices in ([0, 1], [2, 3]):  # shuffle: false, micro_batch_size 2: the first optimizer step
        batch = data.collate([data.train[i] for i in indices])
        inputs = model_inputs(batch)
        with torch.no_grad():
            out_t = swiftkv_vl.set_swiftkv(model, False)(**inputs, output_hidden_states=True)
            out_s = swiftkv_vl.set_swiftkv(model, True)(**inputs, output_hidden_states=True)
        micro_token_counts.append(int(batch["attention_mask"].sum()))
        before = (sum(kl_sums.values()), sum(mse_sums.values()), sum(n_label.values()), sum(n_hidden.values()))
        for row in range(len(indices)):
            kind = "image" if bool((batch["input_ids"][row] == image_id).any()) else "text"
            w = W_IMAGE if kind == "image" else W_TEXT
            for t in range(batch["input_ids"].shape[1]):
                if batch["attention_mask"][row, t]:
                    diff = out_s.hidden_states[-1][row, t] - out_t.hidden_states[-1][row, t]
                    mse_sums[kind] += w * float(diff.pow(2).mean())
                    n_hidden[kind] += 1
                if t + 1 < batch["labels"].shape[1] and batch["labels"][row, t + 1] != IGNORE_INDEX:
                    kl = F.kl_div(F.log_softmax(out_s.logits[row, t] / TEMPERATURE, -1),
                                  F.log_softmax(out_t.logits[row, t] / TEMPERATURE, -1),
                                  log_target=True, reduction="sum")
                    kl_sums[kind] += w * TEMPERATURE**2 * float(kl)
                    target = batch["labels"][row, t + 1]
                    ce["student"] += float(F.cross_entropy(out_s.logits[row, t], target))  # unweighted, T = 1
                    ce["teacher"] += float(F.cross_entropy(out_t.logits[row, t], target))
                    n_label[kind] += 1
        after = (sum(kl_sums.values()), sum(mse_sums.values()), sum(n_label.values()), sum(n_hidden.values()))
        kl_mb, mse_mb, lab_mb, hid_mb = (a - b for a, b in zip(after, before))
        per_micro.append(kl_mb / lab_mb + MULT * mse_mb / hid_mb)
    labels, hidden = sum(n_label.values()), sum(n_hidden.values())
    assert micro_token_counts[0] != micro_token_counts[1], "the test needs micro-batches of different sizes"
    assert n_label["image"] and n_label["text"]
    return {
        "loss": sum(kl_sums.values()) / labels + MULT * sum(mse_sums.values()) / hidden,
        "kl": sum(kl_sums.values()) / labels, "hidden_mse": sum(mse_sums.values()) / hidden,
        "kl_image": kl_sums["image"] / n_label["image"], "kl_text": kl_sums["text"] / n_label["text"],
        "hidden_mse_image": mse_sums["image"] / n_hidden["image"],
        "hidden_mse_text": mse_sums["text"] / n_hidden["text"],
        "label_tokens": labels, "tokens": hidden,
        "student_ce": ce["student"] / labels, "teacher_ce": ce["teacher"] / labels,
        "ce_gap": (ce["student"] - ce["teacher"]) / labels,
        "mean_of_micro_batch_means": sum(per_micro) / len(per_micro),
        "mse_over_label_tokens": (sum(kl_sums.values()) + MULT * sum(mse_sums.values())) / labels,
    }


def test_logged_loss_equals_hand_computation(run):
    config, metrics = run
    expected = _hand_loss(config)
    step1 = metrics[0]
    assert step1["label_tokens"] == expected["label_tokens"] and step1["tokens"] == expected["tokens"]
    assert expected["kl"] > 0.05 and expected["hidden_mse"] > 1e-3, expected  # both terms matter
    # the student's and the teacher's own loss on the labels (issue 19 item 9), per label token of the step
    assert expected["ce_gap"] > 0.01, expected
    for key in ("loss", "kl", "hidden_mse", "kl_image", "kl_text", "hidden_mse_image", "hidden_mse_text",
                "student_ce", "teacher_ce", "ce_gap"):
        assert step1[key] == pytest.approx(expected[key], rel=1e-4), key
    # the wrong normalisations give clearly different numbers, so the check above can tell them apart
    for wrong in ("mean_of_micro_batch_means", "mse_over_label_tokens"):
        assert step1["loss"] != pytest.approx(expected[wrong], rel=2e-3), wrong
    assert metrics[1]["loss"] < step1["loss"]


def test_only_swiftkv_parameters_change(run, teacher):
    config, _ = run
    final = config.parent / "out" / "final"
    trained = load_file(str(final / "model.safetensors"))
    original = load_file(str(teacher / "model.safetensors"))
    swiftkv = {k for k in trained if "_swiftkv" in k}
    assert {k for k in trained if k not in swiftkv} == set(original)
    for name, value in original.items():
        assert torch.equal(trained[name], value), f"{name} changed"
    # every SwiftKV parameter trained away from its init (the teacher's norm / q / mean of k, v)
    lm = "language_model.model."  # the checkpoint key layout transformers writes for LLaVA-NeXT
    init = {lm + "norm_swiftkv.weight": original[lm + "layers.2.input_layernorm.weight"]}
    for i in (2, 3):
        prefix = f"{lm}layers.{i}.self_attn."
        init[prefix + "q_proj_swiftkv.weight"] = original[prefix + "q_proj.weight"]
        init[prefix + "k_proj_swiftkv.weight"] = original[prefix + "k_proj.weight"]
        init[prefix + "v_proj_swiftkv.weight"] = original[prefix + "v_proj.weight"]
    assert swiftkv == set(init)
    for name, start in init.items():
        assert not torch.allclose(trained[name], start), f"{name} did not train"
    assert json.loads((final / "config.json").read_text())["text_config"]["swiftkv"] is True


def test_two_processes_give_the_single_process_loss_and_gradient(run):
    """DDP, 2 ranks x micro-batch 1 x accumulation 2 = the same 4 samples a step as the single-process run, but
    each rank holds samples of different token counts: the loss and the gradient norm must not change."""
    config, single = run
    data = yaml.safe_load(config.read_text())
    data["data"]["micro_batch_size"] = 1
    data["trainer"]["output_dir"] = "ddp"
    data["distributed"] = {"type": "ddp"}
    ddp_config = config.parent / "ddp.yaml"
    ddp_config.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "arctic_vl.cli", str(ddp_config)],
                          cwd=config.parent, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = read_metrics(config.parent / "ddp")
    assert [m["step"] for m in ddp] == [1, 2]
    for a, b in zip(single, ddp):
        assert (a["label_tokens"], a["tokens"]) == (b["label_tokens"], b["tokens"])
        for key in ("loss", "kl", "hidden_mse", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_max_images_per_sample_and_image_processing_batch_size(teacher, synthetic_data, tmp_path, capsys):
    """The origin README's `data.max_images_per_sample` and `image_processing_batch_size` (issue 19 item 9): a
    record over the limit is a bad record (exit 2 naming it, or counted and skipped); processing a sample's images
    one at a time gives the very tensors of one call."""
    from arctic_vl import DATA, MODELS, load_config
    from arctic_vl.cli import main

    records = json.loads((synthetic_data / "train.llava.json").read_text())
    images = [str(synthetic_data / r["image"]) for r in records if "image" in r][:6]

    def record(n: int) -> dict:
        return {"image": images[:n], "conversations": [
            {"from": "human", "value": "<image>\n" * n + "What shapes?"}, {"from": "gpt", "value": "some"}]}

    (tmp_path / "multi.json").write_text(json.dumps([record(2), record(1), record(3)]))

    def config(name: str, **data: object) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"type": "swiftkv_vl", "teacher": str(teacher), "num_key_value_layers": 2},
            "data": {"type": "swiftkv_vl", "sources": ["multi.json"], "shuffle": False, "cache": False, **data},
            "trainer": {"type": "swiftkv_vl", "output_dir": name, "max_steps": 1, "progress_bar": False},
        }, sort_keys=False))
        return path

    capsys.readouterr()
    assert main(["train", str(config("error", max_images_per_sample=2))]) == 2
    err = capsys.readouterr().err
    assert "multi.json: record 2" in err and "field images: 3 images; data.max_images_per_sample allows 2" in err, err
    assert "too_many_images" in err and "Traceback" not in err

    def dataset(path: Path) -> tuple:
        cfg = load_config(path)
        bundle = MODELS.get("swiftkv_vl")(cfg.model, cfg).build()
        data = DATA.get(cfg.data.type)(cfg.data, cfg).build(bundle, seed=0)
        return data, cfg

    whole, _ = dataset(config("whole", max_images_per_sample=2, on_bad_record="skip"))
    assert whole.report.by_reason() == {"too_many_images": 1} and len(whole.train) == 2
    one, _ = dataset(config("one", max_images_per_sample=2, on_bad_record="skip", image_processing_batch_size=1))
    a, b = whole.train[0], one.train[0]  # the two-image record
    vision = [k for k, v in a.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "labels")]
    assert "pixel_values" in vision and a["pixel_values"].shape[0] == 2
    for key in vision:
        assert torch.equal(a[key], b[key]), key

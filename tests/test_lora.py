"""Freezing and LoRA (PEFT) end to end: train from YAML, resume exactly after SIGKILL, export merged + adapter.

The LoRA run: LoRA on the llm, the aligner trained fully (PEFT modules_to_save, plus LLaVA-NeXT's loose
`image_newline`), the vision tower frozen.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import loguru  # noqa: F401  (imported before any capsys capture: its default sink binds the stderr it sees first)
import pytest
import torch
from safetensors.torch import load_file

from tests.e2e_utils import read_metrics, run_python, train_child, write_yaml

# The shared session fixtures: pytest finds fixtures by module-global name (assigned, not imported,
# so ruff's redefinition check accepts the test arguments that use them).

# Plain transformers only (asserted): load final/ and compute logits on an image prompt.
PLAIN = r"""
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
final, out = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(final)
image = Image.new("RGB", (48, 40), (30, 200, 30))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=[text], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
assert not any(m.startswith("arctic_vl") for m in sys.modules)
torch.save({"inputs": dict(inputs), "logits": logits}, out)
"""

LORA = {"r": 4, "alpha": 8, "parts": ["llm"]}
STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def lora_config(tiny_llava: Path, synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory):
    def make(name: str) -> Path:
        d = tmp_path_factory.mktemp(name)
        return write_yaml(d / "run.yaml", {
            "model": {"name_or_path": str(tiny_llava), "freeze": ["vision"], "lora": LORA},
            "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:40"}],
                     "micro_batch_size": 4, "max_length": 256},
            "trainer": {"output_dir": "out", "max_steps": STEPS, "gradient_accumulation_steps": 2,
                        "progress_bar": False, "seed": 3},
            "optimizer": {"lr": 1e-2},
            "scheduler": {"type": "cosine", "warmup_steps": 1},
            "checkpoint": {"every_n_steps": EVERY, "keep_last": 2},
        })
    return make


@pytest.fixture(scope="module")
def reference(lora_config) -> Path:
    from arctic_vl.engine import Engine

    config = lora_config("lora_ref")
    Engine(config).train()  # in-process (saves an interpreter start); the resumed run below is a subprocess
    return config.parent / "out"


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """A saved model's weights under the module names (transformers 5 saves some in a legacy layout)."""
    from arctic_vl.models.loading import load_model

    return load_model(model_dir).state_dict()


def test_lora_run_trains_adapters_aligner_and_nothing_frozen(reference: Path, tiny_llava: Path):
    metrics = read_metrics(reference)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    saved = load_file(str(reference / "checkpoints" / f"step-{STEPS}" / "model.safetensors"))
    # the checkpoint holds exactly the trainable weights, under the loop's names (_StepModule.model -> PeftModel)
    assert all(k.startswith("model.base_model.model.") for k in saved)
    lora_keys = [k for k in saved if ".lora_" in k]
    assert len(lora_keys) == 2 * 2 * 7, "lora_A and lora_B on 7 linears of each of 2 llm layers"
    assert all(".language_model." in k for k in lora_keys)
    rest = sorted(k for k in saved if ".lora_" not in k)
    assert rest == ["model.base_model.model.model.image_newline"] + [
        f"model.base_model.model.model.multi_modal_projector.modules_to_save.default.linear_{i}.{w}"
        for i in (1, 2) for w in ("bias", "weight")]
    # final/: the merged model. Vision (frozen) and embeddings (not LoRA'd) are the base weights exactly;
    # the aligner and the LoRA'd llm linears changed.
    base, final = _weights(tiny_llava), _weights(reference / "final")
    assert sorted(final) == sorted(base)
    vision = [k for k in base if k.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(base[k], final[k]) for k in vision)
    assert torch.equal(base["model.language_model.embed_tokens.weight"],
                       final["model.language_model.embed_tokens.weight"])
    for k in ("model.multi_modal_projector.linear_1.weight", "model.image_newline",
              "model.language_model.layers.0.self_attn.q_proj.weight",
              "model.language_model.layers.1.mlp.down_proj.weight"):
        assert (base[k] - final[k]).abs().max().item() > 1e-4, f"{k} did not train"
    assert (reference / "final" / "adapter" / "adapter_config.json").is_file()


def test_lora_sigkill_and_rerun_is_exact(lora_config, reference: Path):
    config = lora_config("lora_kill")
    assert train_child(config, "kill_step", "3") == -9
    assert read_metrics(config.parent / "out")[-1]["step"] == 3
    train_child(config)  # resumes from step-2
    got, ref = read_metrics(config.parent / "out"), read_metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got, ref)) <= 1e-6
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(got, ref)) <= 1e-5


def test_final_merged_matches_adapter_model(reference: Path, tiny_llava: Path, tmp_path: Path):
    out = tmp_path / "plain.pt"
    proc = run_python(PLAIN, str(reference / "final"), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(out, weights_only=True)
    from peft import PeftModel

    from arctic_vl.models.loading import load_model

    adapter = PeftModel.from_pretrained(load_model(tiny_llava), reference / "final" / "adapter").eval()
    with torch.no_grad():
        logits = adapter(**plain["inputs"]).logits
        base_logits = load_model(tiny_llava).eval()(**plain["inputs"]).logits
    assert (logits - plain["logits"]).abs().max().item() <= 1e-4
    assert (base_logits - logits).abs().max().item() > 1e-3, "the adapter changes the model"

    # ... and the adapter model is the trained one: the training model rebuilt from the last checkpoint
    from arctic_vl.checkpoint.checkpointer import load_trainable_weights
    from arctic_vl.engine import Engine

    factory = Engine(reference / "config.yaml").model_factory()
    trained = factory.build(output_dir=reference).model.eval()
    load_trainable_weights(trained, reference / "checkpoints" / f"step-{STEPS}")
    with torch.no_grad():
        assert (trained(**plain["inputs"]).logits - logits).abs().max().item() <= 1e-5


def _merge_by_hand(base: dict[str, torch.Tensor], ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + alpha/r * B @ A for each LoRA linear; trained aligner copies and image_newline as saved."""
    out = dict(base)
    p = "model.base_model.model."
    for k, v in ckpt.items():
        name = k[len(p):]
        if ".lora_A.default.weight" in name:
            layer = name.split(".lora_A.")[0]
            b = ckpt[f"{p}{layer}.lora_B.default.weight"]
            out[f"{layer}.weight"] = base[f"{layer}.weight"] + (LORA["alpha"] / LORA["r"]) * (b @ v)
        elif ".modules_to_save.default." in name:
            out[name.replace(".modules_to_save.default.", ".")] = v
        elif ".lora_B." not in name:
            out[name] = v
    return out


def test_export_cli_from_mid_run_checkpoint(reference: Path, tiny_llava: Path, tmp_path: Path, cli):
    mid = reference / "checkpoints" / f"step-{STEPS - EVERY}"
    assert mid.is_dir()
    out = tmp_path / "exported"
    rc, _, err = cli("export", str(reference), "--merge-lora", str(out), "--checkpoint", mid.name)
    assert rc == 0, err[-3000:]
    got = _weights(out)
    want = _merge_by_hand(_weights(tiny_llava), load_file(str(mid / "model.safetensors")))
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, worst
    final = _weights(reference / "final")
    projector = "model.multi_modal_projector.linear_1.weight"
    assert (final[projector] - got[projector]).abs().max() > 1e-5
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == LORA["r"]
    # the default (latest) checkpoint reproduces final/ exactly; a checkpoint that is not there is
    # exit 2, naming the ones that are
    rc, _, _ = cli("export", str(reference), "--merge-lora", str(tmp_path / "latest"))
    assert rc == 0
    again = _weights(tmp_path / "latest")
    assert max((again[k] - final[k]).abs().max().item() for k in final) == 0.0
    rc, _, err = cli("export", str(reference), "--merge-lora", str(tmp_path / "x"), "--checkpoint", "step-99")
    assert rc == 2 and f"step-{STEPS}" in err and "Traceback" not in err


def test_freeze_parts_get_no_grad_and_stay_unchanged(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    from arctic_vl.engine import Engine
    from arctic_vl.models.hf import HFModelConfig, HFModelFactory

    bundle = HFModelFactory(HFModelConfig(name_or_path=str(tiny_llava), freeze=["vision", "aligner"])).build()
    ids = torch.randint(5, 1000, (1, 12))
    bundle.model(input_ids=ids).logits.square().mean().backward()
    grads = {n: p.grad for n, p in bundle.model.named_parameters()}
    assert all(grads[n] is None for n in grads if bundle.part_of(n) in ("vision", "aligner"))
    assert all(grads[n] is not None for n in grads if n.startswith("model.language_model.layers."))

    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava), "freeze": ["vision", "aligner"]},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                 "micro_batch_size": 4},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False},
        "optimizer": {"lr": 1e-2},
    })
    summary = Engine(config).train()
    saved = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    assert saved and all(k.startswith(("model.model.language_model.", "model.lm_head.")) for k in saved)
    base, final = _weights(tiny_llava), _weights(tmp_path / "out" / "final")
    frozen = [k for k in base
              if k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"))]
    assert len(frozen) > 10 and all(torch.equal(base[k], final[k]) for k in frozen)
    assert (base["lm_head.weight"] - final["lm_head.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("lora, expect", [
    ({"target": "lm_head"}, "matches the output layer"),
    ({"target": "no_such_layer"}, "matches no linear layer"),
    ({"target": "q_proj("}, "model.lora.target"),
    ({"parts": ["text"]}, "model.lora.parts"),
    ({"modules_to_save": ["no_such_module"]}, "no_such_module"),
    # issue 24 item 8: a rank above a target's smallest side allocates r x (in + out) per layer and adds nothing
    ({"r": 4096}, "model.lora.r: rank 4096 exceeds the smallest dimension of the target layer "
                  "model.language_model.layers.0.self_attn.k_proj (64 -> 32, so at most rank 32)"),
    ({"r": 33, "target": "q_proj|k_proj"}, "the target layer model.language_model.layers.0.self_attn.k_proj"),
])
def test_bad_lora_config_is_a_config_error(tiny_llava: Path, synthetic_data: Path, lora, expect):
    from arctic_vl.engine import Engine
    from arctic_vl.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(expect)):
        Engine({"model": {"name_or_path": str(tiny_llava), "lora": lora},
                "data": {"sources": [str(synthetic_data / "train.llava.json")]}}).model_factory().build()


def test_bad_lora_config_cli_exits_2(tiny_llava: Path, synthetic_data: Path, tmp_path: Path, cli):
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava), "lora": {"target": "lm_head"}},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:4"}]},
        "trainer": {"output_dir": "out", "max_steps": 1, "progress_bar": False},
    })
    rc, _, err = cli("train", str(config))
    assert rc == 2, err[-2000:]
    assert "matches the output layer" in err and "Traceback" not in err


def test_lora_parameter_counts_count_each_parameter_once(tiny_llava: Path):
    """Issue 19 (14): PEFT keeps an original and a trainable copy of every modules_to_save module; the report counts
    the trained copy only: the totals are the base model's count plus the LoRA adapters, the aligner (trained fully)
    counts as in the base model, all of it trainable."""
    from arctic_vl.models.hf import HFModelConfig, HFModelFactory
    from arctic_vl.models.loading import load_model
    from arctic_vl.trainers.report import format_parameter_counts

    base = HFModelFactory(HFModelConfig(name_or_path=str(tiny_llava))).build()
    base_counts = base.parameter_counts()
    plain = load_model(tiny_llava, dtype=torch.float32)
    assert base_counts["total"]["params"] == sum(p.numel() for p in plain.parameters())
    bundle = HFModelFactory(HFModelConfig(name_or_path=str(tiny_llava), freeze=["vision"], lora=LORA)).build()
    named = dict(bundle.model.named_parameters())
    assert any(".original_module." in n for n in named), "the aligner is a PEFT modules_to_save module"
    adapters = sum(p.numel() for n, p in named.items() if ".lora_" in n)
    counts = bundle.parameter_counts()
    assert counts["total"]["params"] == base_counts["total"]["params"] + adapters
    assert counts["aligner"] == {"params": base_counts["aligner"]["params"],
                                 "trainable": base_counts["aligner"]["params"]}
    assert counts["llm"] == {"params": base_counts["llm"]["params"] + adapters, "trainable": adapters}
    assert counts["vision"] == {"params": base_counts["vision"]["params"], "trainable": 0}
    assert counts["total"]["trainable"] == adapters + base_counts["aligner"]["params"]
    line = format_parameter_counts(counts)
    assert f"aligner {_human(base_counts['aligner']['params'])} ({_human(base_counts['aligner']['params'])} " \
           "trainable)" in line


def _human(n: int) -> str:
    from arctic_vl.trainers.report import human_count

    return human_count(n)

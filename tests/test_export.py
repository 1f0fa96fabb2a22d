"""`final/` is a plain HF directory: transformers alone loads it and reproduces the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.e2e_utils import read_metrics, run_python, write_yaml

PLAIN = r"""
import sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
final, out = sys.argv[1], sys.argv[2]
assert not any(m.startswith("arctic_vl") for m in sys.modules)
model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(final)
image = Image.new("RGB", (48, 40), (200, 30, 30))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=[text], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
assert not any(m.startswith("arctic_vl") for m in sys.modules)
torch.save({"inputs": dict(inputs), "logits": logits}, out)
"""


def test_final_loads_with_plain_transformers(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    from arctic_vl.engine import Engine

    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(tiny_llava)},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:16"}],
                 "micro_batch_size": 4},
        "trainer": {"output_dir": "out", "max_steps": 3, "progress_bar": False},
        "optimizer": {"lr": 1e-2},
    })
    summary = Engine(config).train()
    final = Path(summary["export"])
    assert summary["steps"] == 3 and len(read_metrics(tmp_path / "out")) == 3
    assert (final / "model.safetensors").is_file() and (final / "processor_config.json").is_file()
    out = tmp_path / "plain.pt"
    proc = run_python(PLAIN, str(final), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(out, weights_only=True)

    # the trained model: the base weights plus the trainable weights of the last checkpoint
    from arctic_vl.models.loading import load_model

    model = load_model(tiny_llava).eval()
    trained = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in trained.items()}, strict=False)
    with torch.no_grad():
        logits = model(**plain["inputs"]).logits
    assert (logits - plain["logits"]).abs().max().item() <= 1e-5
    base = load_model(tiny_llava).eval()
    with torch.no_grad():
        assert (base(**plain["inputs"]).logits - logits).abs().max().item() > 1e-3, "training changed the model"
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["versions"]["torch"] and "data" in info


def _bf16_checkpoint(source: Path, out: Path) -> Path:
    """`source` re-saved in bfloat16, as published checkpoints are (config.json says `dtype: bfloat16`)."""
    from arctic_vl.models.loading import load_model, load_processor

    model = load_model(source, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    load_processor(source).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    return out


def test_export_keeps_the_source_checkpoints_dtype(tiny_llava: Path, synthetic_data: Path, tmp_path: Path):
    """A bf16 checkpoint trains in fp32 (model.dtype) and exports in bf16 (export_dtype: auto); a config key
    chooses another dtype, LoRA's merged export included."""
    from arctic_vl.engine import Engine
    from arctic_vl.models.loading import load_model

    source = _bf16_checkpoint(tiny_llava, tmp_path / "bf16")
    run = {
        "model": {"name_or_path": str(source)},
        "data": {"sources": [{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                 "micro_batch_size": 4},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False},
        "optimizer": {"lr": 1e-2},
    }
    summary = Engine(write_yaml(tmp_path / "run.yaml", run)).train()
    final = Path(summary["export"])
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(final / "model.safetensors")).values()} == {torch.bfloat16}
    # exactly the fp32 trained weights (bf16 base upcast + the checkpoint's trainable weights), rounded to bf16
    model = load_model(source, dtype=torch.float32)
    trained = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    assert {t.dtype for t in trained.values()} == {torch.float32}, "training keeps fp32 master weights"
    model.load_state_dict({k.removeprefix("model."): v for k, v in trained.items()}, strict=False)
    expected = model.state_dict()
    exported = load_model(final, dtype=torch.bfloat16).state_dict()
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], expected[k].to(torch.bfloat16)) for k in exported)
    before = load_model(source, dtype=torch.bfloat16).state_dict()
    assert any(not torch.equal(exported[k], before[k]) for k in exported), "training changed the weights"

    run["model"].update(export_dtype="float32", lora={"r": 4, "parts": ["llm"]}, freeze=["vision"])
    run["trainer"]["output_dir"] = "out_lora"
    lora = Path(Engine(write_yaml(tmp_path / "lora.yaml", run)).train()["export"])
    assert json.loads((lora / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in load_file(str(lora / "model.safetensors")).values()} == {torch.float32}

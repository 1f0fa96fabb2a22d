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


def _dtype_fields(cfg: dict, path: str = "") -> dict[str, str]:
    """Every dtype field of a config.json, by its path (`dtype`, `text_config.dtype`, ...)."""
    out = {f"{path}{k}": v for k, v in cfg.items() if k in ("dtype", "torch_dtype")}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_dtype_fields(v, f"{path}{k}."))
    return out


def _export(source: Path, out: Path) -> Path:
    """`source` built by the core's HF factory (export_dtype auto) and exported to `out` as training would."""
    from arctic_vl.models.hf import HFModelConfig, HFModelFactory

    factory = HFModelFactory(HFModelConfig(name_or_path=str(source)))
    bundle = factory.build(device=torch.device("cpu"))
    return factory.export(bundle, bundle.model, out)


def _stored(out: Path) -> dict[torch.dtype, int]:
    from collections import Counter

    counts: Counter[torch.dtype] = Counter()
    for f in out.glob("*.safetensors"):
        for t in load_file(str(f)).values():
            counts[t.dtype] += t.numel()
    return dict(counts)


def test_export_dtype_auto_is_the_stored_dtype_not_a_config_field(tiny_llava: Path, tmp_path: Path):
    """A float32 checkpoint whose config says bfloat16 in its sub-configs (and nothing at the top) exports in
    float32, the dtype its tensors are stored in, and every dtype field of the exported config says so."""
    import shutil

    source = Path(shutil.copytree(tiny_llava, tmp_path / "fp32"))
    cfg = json.loads((source / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    cfg["text_config"]["dtype"] = cfg["vision_config"]["dtype"] = "bfloat16"
    (source / "config.json").write_text(json.dumps(cfg))
    assert set(_stored(source)) == {torch.float32}
    out = _export(source, tmp_path / "out")
    assert set(_stored(out)) == {torch.float32}
    fields = _dtype_fields(json.loads((out / "config.json").read_text()))
    assert {"dtype", "text_config.dtype", "vision_config.dtype"} <= set(fields)
    assert set(fields.values()) == {"float32"}, fields


def test_export_dtype_auto_of_mixed_shards_is_the_majoritys(tiny_llava: Path, tmp_path: Path):
    """Weights stored mostly in bfloat16 (the vision tower in float32) across several shards, the config saying
    float32: the export is bfloat16 (the dtype of most parameters, read from every shard's header), the
    mix is said, and every dtype field of the exported config is bfloat16."""
    from loguru import logger

    from arctic_vl.models.loading import load_model, load_processor

    model = load_model(tiny_llava, dtype=torch.bfloat16)
    model.model.vision_tower.to(torch.float32)
    source = tmp_path / "mixed"
    model.save_pretrained(source, safe_serialization=True, max_shard_size="200KB")
    load_processor(tiny_llava).save_pretrained(source)
    cfg = json.loads((source / "config.json").read_text())
    cfg["dtype"] = "float32"
    (source / "config.json").write_text(json.dumps(cfg))
    counts = _stored(source)
    assert set(counts) == {torch.bfloat16, torch.float32} and counts[torch.bfloat16] > counts[torch.float32]
    shards = sorted(source.glob("*.safetensors"))
    assert len(shards) > 1 and (source / "model.safetensors.index.json").is_file()
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="INFO")
    try:
        out = _export(source, tmp_path / "out")
    finally:
        logger.remove(sink)
    assert set(_stored(out)) == {torch.bfloat16}
    assert set(_dtype_fields(json.loads((out / "config.json").read_text())).values()) == {"bfloat16"}
    assert any("mixed dtypes" in m and f"BF16 {counts[torch.bfloat16]}" in m for m in messages), messages
    from arctic_vl.models.export_dtype import stored_dtype

    stored = stored_dtype(source)  # from the headers of both shards, no tensor loaded
    assert stored.name == "bfloat16" and stored.mixed
    assert stored.params == {"BF16": counts[torch.bfloat16], "F32": counts[torch.float32]}

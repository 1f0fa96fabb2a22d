"""All six VLM families end to end: config -> Engine.train -> final/ -> plain transformers, equal logits.

Per family: a tiny random model trains two optimizer steps (one epoch of eight samples: single-image,
text-only and a two-image sample, so every kind goes through a forward and a backward) from a YAML
config through `arctic_vl.engine.Engine`. The exported `final/` is then loaded in a fresh interpreter
that never imports arctic_vl, with transformers' Auto classes only, and must give the trained
model's logits (base weights + the checkpoint's trainable weights) to 1e-5.

Processors: LlavaOnevision / Qwen processors cannot be built without torchvision, so the plain side
loads the parts that can (AutoTokenizer, AutoImageProcessor; AutoProcessor for llava and llava_next) and checks
they reproduce the inputs arctic_vl's processor made; and `processor_config.json` must name
transformers' own processor class, which plain `AutoProcessor` loads where torchvision is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.e2e_utils import read_metrics, run_python, write_yaml

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
HF_PROCESSOR = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor",
                "llava_onevision": "LlavaOnevisionProcessor", "qwen2_vl": "Qwen2VLProcessor",
                "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
# Tiny and quick: one layer each side; Qwen's mRoPE needs head_dim 16 (hidden 32, 2 heads) at least.
SHAPE = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "vision_layers": 1,
         "vision_hidden": 32}

# The plain-transformers side. It must not import arctic_vl (checked before and after).
PLAIN = r"""
import json, sys
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

final, family, expected_class, given_file, out = sys.argv[1:6]
assert not any(m.startswith("arctic_vl") for m in sys.modules)
saved_class = json.load(open(f"{final}/processor_config.json"))["processor_class"]
tokenizer_class = json.load(open(f"{final}/tokenizer_config.json")).get("processor_class")
assert saved_class == expected_class == tokenizer_class, (saved_class, tokenizer_class, expected_class)
assert getattr(transformers, saved_class).__module__.startswith("transformers.models."), saved_class

given = torch.load(given_file, weights_only=True)
inputs = given["inputs"]
image = Image.new("RGB", (56, 48), (245, 245, 245))
image.paste((40, 80, 220), (8, 8, 36, 36))
tokenizer = AutoTokenizer.from_pretrained(final)
ids = tokenizer(given["expanded_text"], return_tensors="pt")["input_ids"]
assert torch.equal(ids, inputs["input_ids"]), "plain AutoTokenizer gives other ids"
image_processor = AutoImageProcessor.from_pretrained(final)
# OneVision's processor asks its image processor for a nested list: one sample holding its images.
pixels = image_processor(images=[[image]] if family == "llava_onevision" else [image], return_tensors="pt")
vision_keys = [k for k in inputs if k not in ("input_ids", "attention_mask", "mm_token_type_ids")]
assert vision_keys and all(torch.equal(pixels[k], inputs[k]) for k in vision_keys), vision_keys
if family in ("llava", "llava_next"):  # no video part: plain AutoProcessor builds these processors here too
    processor = AutoProcessor.from_pretrained(final)
    assert type(processor).__name__ == saved_class
    again = processor(images=[image], text=[given["prompt"]], return_tensors="pt")
    assert set(again) == set(inputs) and all(torch.equal(again[k], inputs[k]) for k in inputs)
model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
assert type(model).__name__ == json.load(open(f"{final}/config.json"))["architectures"][0]
with torch.no_grad():
    logits = model(**inputs).logits
assert not any(m.startswith("arctic_vl") for m in sys.modules)
torch.save({"logits": logits, "model_class": type(model).__name__}, out)
"""


def _image() -> Image.Image:
    """The probe image (the PLAIN snippet draws the same one)."""
    image = Image.new("RGB", (56, 48), (245, 245, 245))
    image.paste((40, 80, 220), (8, 8, 36, 36))
    return image


@pytest.fixture(scope="module")
def mixed_records(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight messages-JSONL records: five single-image, two text-only, one two-image (one epoch = two steps of 4)."""
    rows = [json.loads(line) for line in (synthetic_data / "train.messages.jsonl").read_text().splitlines()]
    with_image = [r for r in rows if r.get("images")][:6]
    text_only = [r for r in rows if not r.get("images")][:2]
    a, b = with_image[4], with_image[5]
    two_images = {"messages": [
        {"role": "user", "content": "<image>\n<image>\nWhat colour is the shape in the second image?"},
        {"role": "assistant", "content": "blue"}],
        "images": [str(synthetic_data / a["images"][0]), str(synthetic_data / b["images"][0])]}
    records = []
    for r in with_image[:4] + text_only[:1] + [two_images] + with_image[4:5] + text_only[1:]:
        images = [str(synthetic_data / p) if not Path(p).is_absolute() else p for p in r.get("images", [])]
        records.append({"messages": r["messages"], **({"images": images} if images else {})})
    out = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [len(r.get("images", [])) for r in records] == [1, 1, 1, 1, 0, 2, 1, 0]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_exports_and_loads_with_plain_transformers(family: str, mixed_records: Path, tmp_path: Path):
    from arctic_vl.engine import Engine
    from arctic_vl.models.loading import load_model, load_processor
    from arctic_vl.models.tiny import make_tiny_model

    torch.set_num_threads(1)
    base = make_tiny_model(family, tmp_path / "base", seed=0, **SHAPE)
    config = write_yaml(tmp_path / "run.yaml", {
        "model": {"name_or_path": str(base)},
        "data": {"sources": [str(mixed_records)], "micro_batch_size": 4, "max_length": 512},
        "trainer": {"output_dir": "out", "max_steps": 2, "progress_bar": False, "seed": 3},
        "optimizer": {"lr": 1e-2},
        "scheduler": {"type": "constant"},
    })
    summary = Engine(config).train()
    metrics = read_metrics(tmp_path / "out")
    assert summary["steps"] == 2 and summary["skipped_records"] == {}
    assert [m["samples"] for m in metrics] == [4, 4], "one epoch: all eight records trained"
    assert all(torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0 for m in metrics)
    final = Path(summary["export"])
    assert (final / "model.safetensors").is_file()

    # Inputs made by arctic_vl's processor (the image-only class for OneVision / Qwen) from final/.
    processor = load_processor(final)
    image_part = "<|vision_start|><|image_pad|><|vision_end|>" if family.startswith("qwen") else "<image>"
    prompt = (f"<|im_start|>user\n{image_part}\nWhat colour is the square?<|im_end|>\n"
              "<|im_start|>assistant\n")
    inputs = dict(processor(images=[_image()], text=[prompt], return_tensors="pt"))
    expanded = processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    given = tmp_path / "given.pt"
    torch.save({"inputs": inputs, "prompt": prompt, "expanded_text": expanded}, given)
    out = tmp_path / "plain.pt"
    proc = run_python(PLAIN, str(final), family, HF_PROCESSOR[family], str(given), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(out, weights_only=True)

    # The trained model: base weights plus the last checkpoint's trainable weights.
    model = load_model(base).eval()
    trained = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    _missing, unexpected = model.load_state_dict({k.removeprefix("model."): v for k, v in trained.items()},
                                                 strict=False)
    assert not unexpected
    assert plain["model_class"] == type(model).__name__
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == plain["logits"].shape
    assert (logits - plain["logits"]).abs().max().item() <= 1e-5
    with torch.no_grad():
        untrained = load_model(base).eval()(**inputs).logits
    assert (untrained - logits).abs().max().item() > 1e-3, "training changed the model"

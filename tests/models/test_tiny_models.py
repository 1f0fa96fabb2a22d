"""Tiny offline models: tokenizer, configs, save/load round trip with identical logits, CLI, loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer

import arctic_vl.models.processors  # noqa: F401  (registers the image-only processors)
from arctic_vl.errors import ConfigError
from arctic_vl.models.families import FAMILIES, get_family
from arctic_vl.models.loading import family_of_dir, load_model, load_processor
from arctic_vl.models.processors import PROCESSOR_CLASSES
from arctic_vl.models.tiny import (
    EOT,
    IMAGE_TOKENS,
    SPECIAL_TOKENS,
    build_tokenizer,
    make_tiny_model,
    make_tiny_model_cli,
    tiny_config,
)


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_tokenizer_vocab_and_special_tokens():
    tok = build_tokenizer()
    assert 900 <= len(tok) <= 1024
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(len(SPECIAL_TOKENS)))  # fixed small ids, inside any tiny vocab
    assert tok.pad_token_id == 0 and tok.eos_token == EOT
    for token in IMAGE_TOKENS:  # each image token is one token, never split
        assert tok("a" + token + "b")["input_ids"][1:-1] == [tok.convert_tokens_to_ids(token)]
    words = "red green blue yellow purple orange cyan white circle square triangle star left right"
    # The corpus taught it whole words: one token per common word (with its leading space).
    assert len(tok(" " + words)["input_ids"]) == len(words.split())
    text = 'What colour is the star? {"bbox_2d": [12, 340, 560, 999], "desc": "red circle"}'
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    tok = build_tokenizer("qwen2_vl")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nHow many stars?<|im_end|>\n"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.image_token == "<|image_pad|>" and loaded.chat_template == tok.chat_template
    as_string = [{"role": "user", "content": "Which shape?"}, {"role": "assistant", "content": "star"}]
    assert loaded.apply_chat_template(as_string, tokenize=False) == (
        "<|im_start|>user\nWhich shape?<|im_end|>\n<|im_start|>assistant\nstar<|im_end|>\n"
    )
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"}]}]
    assert loaded.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which shape?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    llava = build_tokenizer("llava_next")
    assert "<|im_start|>user\n<image>Which shape?" in llava.apply_chat_template(as_parts, tokenize=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_config_invariants(family):
    config = tiny_config(family)
    text, vision = config.get_text_config(), config.vision_config
    tok = build_tokenizer(family)
    assert text.vocab_size >= len(tok)
    assert max(text.bos_token_id, text.eos_token_id, text.pad_token_id) < text.vocab_size
    if get_family(family).is_qwen:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
        if family == "qwen3_vl":
            assert text.rope_parameters["mrope_interleaved"] is True and text.head_dim == 16
            assert math.isqrt(vision.num_position_embeddings) ** 2 == vision.num_position_embeddings
            assert max(vision.deepstack_visual_indexes) < vision.depth
        if family == "qwen2_5_vl":
            assert max(vision.fullatt_block_indexes) < vision.depth
    else:
        assert config.image_token_index == tok.convert_tokens_to_ids("<image>")
        if family == "llava":  # LLaVA-1.5: one crop per image, no any-res grid
            assert not hasattr(config, "image_grid_pinpoints")
        else:
            assert all(max(p) <= 2 * vision.image_size for p in config.image_grid_pinpoints)


def test_tiny_config_shape_and_errors():
    config = tiny_config("qwen2_vl", layers=3, hidden=96, heads=6, kv_heads=3)
    assert config.text_config.num_hidden_layers == 3 and config.text_config.hidden_size == 96
    assert sum(config.text_config.rope_parameters["mrope_section"]) == 8
    assert tiny_config("llava_next", vision_feature_layer=-2).vision_feature_layer == -2
    with pytest.raises(ValueError, match="unknown tiny-model setting"):
        tiny_config("llava_next", hiden=32)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_config("llava_next", vocab_size=100)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_identical_logits(family, tiny_dirs):
    path = tiny_dirs[family]
    assert (path / "model.safetensors").is_file()
    processor = load_processor(path)  # checkpoints name HF's processor class: see models/processors.py
    assert type(processor) is PROCESSOR_CLASSES[family]
    placeholder = get_family(family).image_placeholder
    texts = [f"<|im_start|>user\n{placeholder}What colour is the circle?<|im_end|>\n<|im_start|>assistant\nred"]
    batch = processor(text=texts, images=[[_image(48, 40, 1)]], return_tensors="pt")
    assert (batch["input_ids"] == processor.image_token_id).sum() > 0

    # The same seed rebuilds the same weights in memory: the saved copy must give the same logits.
    torch.manual_seed(0)
    fresh = AutoModelForImageTextToText.from_config(tiny_config(family)).eval()
    loaded = load_model(path).eval()
    auto = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        expected = fresh(**batch).logits
        assert torch.equal(loaded(**batch).logits, expected)
        assert torch.equal(auto(**batch).logits, expected)
    assert expected.shape[:2] == batch["input_ids"].shape and torch.isfinite(expected).all()


def test_processor_round_trip_equal_outputs(tiny_dirs, tmp_path):
    path = tiny_dirs["qwen3_vl"]
    processor = load_processor(path)
    processor.save_pretrained(tmp_path)
    # saved under HF's own class name (plain AutoProcessor loads it where torchvision is installed) ...
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    (tmp_path / "config.json").write_bytes((path / "config.json").read_bytes())  # load_processor reads the family
    again = load_processor(tmp_path)  # ... and load_processor maps it to the image-only class here
    assert type(again) is type(processor)
    text = ["<|vision_start|><|image_pad|><|vision_end|>Describe the image."]
    a = processor(text=text, images=[_image(64, 48, 2)], return_tensors="pt")
    b = again(text=text, images=[_image(64, 48, 2)], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_family_of_dir_and_errors(tiny_dirs, tmp_path):
    for family, path in tiny_dirs.items():
        assert family_of_dir(path) is FAMILIES[family]
    with pytest.raises(ConfigError, match="does not exist"):
        family_of_dir(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"model_type 'bert', which arctic_vl cannot train; "
                                          r"supported model types: llava, llava_next"):
        family_of_dir(tmp_path)
    with pytest.raises(ConfigError, match="flash_attention_2"):
        load_model(tiny_dirs["qwen2_vl"], attn_implementation="flash_attention_2")
    assert load_model(tiny_dirs["qwen2_vl"], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_cli_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "cli_model"
    rc = make_tiny_model_cli(["llava_onevision", str(out), "--layers", "1", "--hidden", "32", "--heads", "2",
                              "--kv-heads", "1", "--vision-layers", "1", "--vision-hidden", "32", "--seed", "3"])
    assert rc == 0 and str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 1 and config["text_config"]["hidden_size"] == 32
    assert config["vision_config"]["hidden_size"] == 32
    assert type(load_processor(out)) is PROCESSOR_CLASSES["llava_onevision"]
    # The same seed and shape through the Python API give the very same weights.
    other = make_tiny_model("llava_onevision", tmp_path / "same", seed=3, layers=1, hidden=32, heads=2,
                            kv_heads=1, intermediate=64, vision_layers=1, vision_hidden=32)
    a, b = load_model(out), load_model(other)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_load_processor_of_a_checkpoint_naming_hf_processor(tiny_dirs, tmp_path):
    # A downloaded Qwen2-VL checkpoint names HF's processor, whose video part needs torchvision.
    import shutil

    target = tmp_path / "hf_named"
    shutil.copytree(tiny_dirs["qwen2_vl"], target)
    for name in ("processor_config.json", "tokenizer_config.json"):
        data = json.loads((target / name).read_text())
        data["processor_class"] = "Qwen2VLProcessor"
        (target / name).write_text(json.dumps(data))
    processor = load_processor(target)
    assert type(processor) is PROCESSOR_CLASSES["qwen2_vl"]  # no torchvision here: our image-only class
    text = ["<|vision_start|><|image_pad|><|vision_end|>Describe the image."]
    ours = load_processor(tiny_dirs["qwen2_vl"])
    a = processor(text=text, images=[_image(64, 48, 4)], return_tensors="pt")
    b = ours(text=text, images=[_image(64, 48, 4)], return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in b)

"""Tests of `init_from_backbone`: key mapping, part skipping by real prefixes, safetensors-only reading."""

from __future__ import annotations

import json

import pytest
import torch
from alternating_attn.backbone import WeightReport, init_from_backbone, map_backbone_key
from alternating_attn.configuration_alternating import (
    LlavaQwenAlternatingConfig,
    LlavaQwenAlternatingCrossConfig,
)
from alternating_attn.modeling_alternating import composite_model_class
from safetensors.torch import save_file
from transformers import LlavaOnevisionConfig, Qwen2Config, Qwen2ForCausalLM

torch.set_num_threads(1)

IMAGE = 120
TEXT_CONFIG = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 16,
}
COMPOSITE_KWARGS = {
    "image_token_index": IMAGE,
    "video_token_index": 121,
    "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
}
NON_LLM = ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")


def make_composite(variant: str, seed: int, **text_overrides):
    config_class = {
        "alternating": LlavaQwenAlternatingConfig,
        "alternating_cross": LlavaQwenAlternatingCrossConfig,
        "base": LlavaOnevisionConfig,
    }[variant]
    text = {"model_type": "qwen2", **TEXT_CONFIG, **text_overrides}
    config = config_class(text_config=text, vision_config=dict(VISION_CONFIG), **COMPOSITE_KWARGS)
    torch.manual_seed(seed)
    model = composite_model_class(variant)(config).eval()
    model.set_attn_implementation("eager")
    return model


def image_batch(model):
    pixel_values = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    image_sizes = torch.tensor([[32, 32]])
    with torch.no_grad():
        count = (
            model.model.get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            )
            .pooler_output[0]
            .shape[0]
        )
    ids = torch.tensor([[5, 6, *[IMAGE] * count, 7, 8, 9]])
    return {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes}


def non_llm_names(model) -> set[str]:
    return {name for name in model.state_dict() if name.startswith(NON_LLM)}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("variant", ["alternating", "alternating_cross", "base"])
def test_qwen2_backbone_fills_every_language_model_parameter(tmp_path, variant, tie):
    torch.manual_seed(11)
    backbone = Qwen2ForCausalLM(Qwen2Config(**TEXT_CONFIG, tie_word_embeddings=tie)).eval()
    backbone.save_pretrained(tmp_path)
    composite = make_composite(variant, seed=0)

    report = init_from_backbone(composite, tmp_path)

    assert report.unexpected == []
    assert report.skipped == []
    assert set(report.missing) == non_llm_names(composite)  # only vision / aligner / newline are left
    assert len(report.missing) > 0
    backbone_state = backbone.state_dict()
    composite_state = composite.state_dict()
    llm_names = [n for n in composite_state if not n.startswith(NON_LLM)]
    assert sorted(report.copied) == sorted(llm_names)
    for name in llm_names:
        source = (
            "lm_head.weight" if name == "lm_head.weight" else name.replace("model.language_model.", "model.")
        )
        assert torch.equal(composite_state[name], backbone_state[source]), name

    if variant == "base":
        # With no special layers, the composite's language model IS the backbone on text.
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        with torch.no_grad():
            expected = backbone(input_ids=ids).logits
            got = composite(input_ids=ids).logits
        assert (expected - got).abs().max().item() <= 1e-6


@pytest.mark.parametrize("sharded", [False, True])
def test_llava_onevision_checkpoint_without_skipping_reproduces_it(tmp_path, sharded):
    source = make_composite("base", seed=5)
    source.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    target = make_composite("base", seed=6)
    inputs = image_batch(source)

    report = init_from_backbone(target, tmp_path, skip_parts=[])

    assert report.missing == []
    assert report.unexpected == []
    assert report.skipped == []
    assert len(report.copied) == len(set(map(id, source.state_dict().values())))
    with torch.no_grad():
        expected = source(**inputs).logits
        got = target(**inputs).logits
    assert (expected - got).abs().max().item() <= 1e-6


def test_llava_onevision_checkpoint_into_alternating_skips_parts_by_real_prefixes(tmp_path):
    source = make_composite("base", seed=5)
    # On disk transformers writes LLaVA-OneVision keys as language_model.*, vision_tower.*, ...
    source.save_pretrained(tmp_path)
    target = make_composite("alternating_cross", seed=6)
    untouched = {n: t.clone() for n, t in target.state_dict().items() if n.startswith(NON_LLM)}

    report = init_from_backbone(target, tmp_path)  # default: skip aligner and vision

    skipped_names = {name for name, _ in report.skipped}
    assert skipped_names == non_llm_names(target)
    reasons = dict(report.skipped)
    assert reasons["model.image_newline"] == "part 'aligner'"
    assert reasons["model.multi_modal_projector.linear_1.weight"] == "part 'aligner'"
    assert all(reasons[n] == "part 'vision'" for n in skipped_names if n.startswith("model.vision_tower."))
    assert not any(name.startswith(NON_LLM) for name in report.copied)
    assert set(report.missing) == non_llm_names(target)
    assert report.unexpected == []
    for name, before in untouched.items():  # really not copied
        assert torch.equal(target.state_dict()[name], before), name

    only_vision = init_from_backbone(make_composite("alternating", seed=6), tmp_path, skip_parts=["vision"])
    assert {n for n in only_vision.missing} == {n for n in non_llm_names(target) if "vision_tower" in n}


def test_shape_mismatch_is_skipped_and_reported(tmp_path):
    torch.manual_seed(1)
    backbone = Qwen2ForCausalLM(Qwen2Config(**{**TEXT_CONFIG, "intermediate_size": 48}))
    backbone.save_pretrained(tmp_path)
    composite = make_composite("alternating", seed=0)
    report = init_from_backbone(composite, tmp_path)
    mlp = [(n, r) for n, r in report.skipped if ".mlp." in n]
    assert len(mlp) == 3 * TEXT_CONFIG["num_hidden_layers"]
    assert all(
        r.startswith("shape (48, 32) != (64, 32)") or r.startswith("shape (32, 48) != (32, 64)")
        for _, r in mlp
    )
    assert {n for n, _ in mlp} <= set(report.missing)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in report.copied


def test_original_llava_repo_layout_is_mapped(tmp_path):
    """Keys as the original LLaVA(-OneVision) repo writes them (model.layers, model.mm_projector.0, ...)."""
    source = make_composite("base", seed=5)
    renamed = {}
    for name, tensor in source.state_dict().items():
        key = name.replace("model.language_model.", "model.")
        key = key.replace("model.vision_tower.", "model.vision_tower.vision_tower.")
        key = key.replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
        key = key.replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")
        renamed[key] = tensor.clone().contiguous()
    save_file(renamed, str(tmp_path / "model.safetensors"))
    target = make_composite("alternating", seed=6)
    report = init_from_backbone(target, tmp_path / "model.safetensors", skip_parts=())
    assert report.missing == []
    assert report.unexpected == []


def test_map_backbone_key_table():
    cases = {
        "model.layers.0.mlp.up_proj.weight": "model.language_model.layers.0.mlp.up_proj.weight",
        "lm_head.weight": "lm_head.weight",
        "embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "norm.weight": "model.language_model.norm.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "language_model.model.norm.weight": "model.language_model.norm.weight",
        "language_model.norm.weight": "model.language_model.norm.weight",
        "vision_tower.vision_model.post_layernorm.bias": "model.vision_tower.vision_model.post_layernorm.bias",
        "image_newline": "model.image_newline",
        "model.image_newline": "model.image_newline",
        "model.language_model.norm.weight": "model.language_model.norm.weight",
        "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
        "something.else": None,
    }
    for key, expected in cases.items():
        assert map_backbone_key(key) == expected, key


def test_state_dict_input_unexpected_keys_and_base_model_target():
    torch.manual_seed(2)
    backbone = Qwen2ForCausalLM(Qwen2Config(**TEXT_CONFIG))
    state = {**backbone.state_dict(), "rotary.extra": torch.zeros(3), "score.weight": torch.zeros(2, 32)}
    composite = make_composite("alternating", seed=0)
    report = init_from_backbone(composite.model, state)  # the base model: names without the `model.` prefix
    assert sorted(report.unexpected) == ["lm_head.weight", "rotary.extra", "score.weight"]
    assert "language_model.layers.3.mlp.down_proj.weight" in report.copied
    assert set(report.missing) == {n.removeprefix("model.") for n in non_llm_names(composite)}


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    composite = make_composite("alternating", seed=0)
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin"):
        init_from_backbone(composite, tmp_path)
    with pytest.raises(ValueError, match=r"only \.safetensors"):
        init_from_backbone(composite, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="Unknown part"):
        init_from_backbone(composite, {}, skip_parts=["projector"])


def test_report_format_counts_and_truncates():
    report = WeightReport(
        copied=[f"c{i}" for i in range(25)],
        skipped=[("s0", "part 'vision'")],
        missing=["m0", "m1", "m2"],
        unexpected=[],
    )
    text = report.format(first=2)
    lines = text.splitlines()
    assert lines[0] == "copied: 25, skipped: 1, missing: 3, unexpected: 0"
    assert "copied (first 2 of 25):" in lines
    assert "  c1" in lines and "  c2" not in lines
    assert "  s0: part 'vision'" in lines
    assert "missing (first 2 of 3):" in lines
    assert "unexpected" not in text.split("\n", 1)[1]
    assert len(report.format().splitlines()) == 1 + 1 + 20 + 1 + 1 + 1 + 3

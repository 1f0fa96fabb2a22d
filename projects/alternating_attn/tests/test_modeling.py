"""Tests of the alternating-attention models: masks, backends, KV cache, save/reload, variant checks.

Tiny LLaVA-OneVision composites (text hidden 32, 6 layers; SigLIP-like vision hidden 32, 2 layers, 32 px tiles of
2x2 patches). Image-token counts are taken from the model's own `get_image_features`, never computed by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from alternating_attn.configuration_alternating import (
    LlavaQwenAlternatingConfig,
    LlavaQwenAlternatingCrossConfig,
    Qwen2AlternatingConfig,
    alternating_layer_indices,
)
from alternating_attn.modeling_alternating import (
    MODALITY_CACHE_ATTRIBUTE,
    AlternatingQwen2ForCausalLM,
    LlavaQwenAlternatingCrossForConditionalGeneration,
    LlavaQwenAlternatingForConditionalGeneration,
    composite_model_class,
)
from alternating_attn.variants import (
    VARIANT_MODEL_TYPES,
    build_composite_config,
    check_variant,
    read_model_type,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

torch.set_num_threads(1)

IMAGE = 120
VIDEO = 121
PAD = 0
EOS = 2
NUM_LAYERS = 6  # special layers 1 and 3; layer 5 is odd but last, so plain causal
SPECIAL = [1, 3]
VARIANTS = ["alternating", "alternating_cross"]

TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
    "pad_token_id": PAD,
    "bos_token_id": 1,
    "eos_token_id": EOS,
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
    "video_token_index": VIDEO,
    "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
}


def make_model(variant: str, attn: str = "eager", seed: int = 0):
    config_class = {
        "alternating": LlavaQwenAlternatingConfig,
        "alternating_cross": LlavaQwenAlternatingCrossConfig,
        "base": LlavaOnevisionConfig,
    }[variant]
    config = config_class(
        text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG), **COMPOSITE_KWARGS
    )
    torch.manual_seed(seed)
    model = composite_model_class(variant)(config).eval()
    model.set_attn_implementation(attn)
    return model


def image_inputs(model, sizes: list[list[int]], seed: int = 1):
    """pixel_values (5D, padded to the largest patch count), image_sizes and the model's token count per image."""
    generator = torch.Generator().manual_seed(seed)
    image_sizes = torch.tensor(sizes)
    pixel_values = torch.randn(len(sizes), 3, 3, 32, 32, generator=generator)
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
    return pixel_values, image_sizes, [f.shape[0] for f in features]


def pad_batch(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` makes them: count of real tokens before, 0 on padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def expected_allowed(ids: torch.Tensor, mask: torch.Tensor, variant: str | None) -> torch.Tensor:
    """(batch, q, k) booleans computed from first principles; `variant=None` is plain causal + padding."""
    length = ids.shape[1]
    modality = ids == IMAGE
    causal = torch.ones(length, length).tril().bool()
    allowed = causal[None] & mask.bool()[:, None, :]
    if variant is not None:
        same = modality[:, :, None] == modality[:, None, :]
        rule = same if variant == "alternating" else (~same | torch.eye(length, dtype=torch.bool)[None])
        allowed = allowed & rule
    return allowed


def mixed_rows(counts: list[int]) -> list[list[int]]:
    """Sample 0: text, image, text. Sample 1: image first, then text. Sample 2: text only."""
    return [
        [5, 6, *[IMAGE] * counts[0], 7, 8, 9, 10],
        [*[IMAGE] * counts[1], 11, 12, 13],
        [14, 15, 16, 17, 18, 19, 20],
    ]


def test_layer_schedule():
    assert alternating_layer_indices(6) == [1, 3]
    assert alternating_layer_indices(4) == [1]
    assert alternating_layer_indices(5) == [1, 3]
    assert alternating_layer_indices(2) == []
    assert Qwen2AlternatingConfig(num_hidden_layers=8).alternating_layers == [1, 3, 5]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_eager_attention_probabilities_follow_the_mask(variant, side):
    model = make_model(variant)
    pixel_values, image_sizes, counts = image_inputs(model, [[32, 64], [32, 32]])
    ids, mask = pad_batch(mixed_rows(counts), side)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            output_attentions=True,
        )
    assert len(out.attentions) == NUM_LAYERS
    real_queries = mask.bool()  # padded query rows are fully masked: their probabilities carry no meaning
    for layer, probs in enumerate(out.attentions):
        allowed = expected_allowed(ids, mask, variant if layer in SPECIAL else None)
        allowed = allowed[:, None].expand_as(probs)  # every head
        rows = real_queries[:, None, :, None].expand_as(probs)
        assert torch.all(probs[rows & ~allowed] == 0.0), f"layer {layer}: mass on forbidden keys"
        assert torch.all(probs[rows & allowed] > 0.0), f"layer {layer}: allowed key got no mass"
        # The special layers really differ from causal here (the batch has images), so the check has teeth.
        if layer in SPECIAL:
            assert (expected_allowed(ids, mask, None) & ~expected_allowed(ids, mask, variant)).any()


def test_text_only_masks_are_causal_for_alternating_and_self_only_for_cross():
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ids, mask = pad_batch(rows, "left")
    for variant in VARIANTS:
        model = make_model(variant)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        probs = out.attentions[1][:, 0]
        real = mask.bool()
        causal = expected_allowed(ids, mask, None)
        if variant == "alternating":
            # Everything is text: the within-modality rule removes nothing.
            assert torch.equal(probs[real] > 0, causal[real])
        else:
            # Cross-modality with no image: each query sees only itself, with probability exactly 1.
            diagonal = torch.diagonal(probs, dim1=-2, dim2=-1)
            assert torch.equal(diagonal[real], torch.ones(int(real.sum())))
            assert int((probs[real] > 0).sum()) == int(real.sum())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sdpa_equals_eager(variant, side):
    eager = make_model(variant, "eager")
    sdpa = make_model(variant, "sdpa")
    pixel_values, image_sizes, counts = image_inputs(eager, [[32, 64], [32, 32]])
    ids, mask = pad_batch(mixed_rows(counts), side)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }
    with torch.no_grad():
        logits_eager = eager(**inputs).logits
        logits_sdpa = sdpa(**inputs).logits
    real = mask.bool()
    assert (logits_eager[real] - logits_sdpa[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_rows_fall_back_to_the_dense_mask_on_special_layers(variant, tmp_path):
    """Packing through the core's loader: the ordinary layers attend per sample (`arctic_varlen`, no mask), the
    special layers build a dense mask: their modality rule ANDed with a same-sample rule, on absolute indices
    (transformers 5.23 remaps packed mask functions to within-sample positions, which broke the modality lookup
    for every sample after the first); every packed sample's logits equal the sample run alone (eager)."""
    from arctic_vl import load_model, load_plugins

    load_plugins()  # maps the composite model types onto the llava_onevision family
    make_model(variant, "sdpa").save_pretrained(tmp_path)
    packed_model = load_model(tmp_path).eval()
    assert packed_model.model.language_model.config._attn_implementation == "arctic_varlen"
    alone_model = make_model(variant, "eager")
    pixel_values, image_sizes, counts = image_inputs(alone_model, [[32, 64], [32, 32]])
    rows = mixed_rows(counts)
    ids = torch.tensor([[t for row in rows for t in row]])
    positions_ = torch.cat([torch.arange(len(row)) for row in rows])[None]
    with torch.no_grad():
        packed = packed_model(input_ids=ids, position_ids=positions_, pixel_values=pixel_values,
                              image_sizes=image_sizes, use_cache=False).logits[0]
        at = 0
        for k, row in enumerate(rows):
            images = {"pixel_values": pixel_values[k:k + 1], "image_sizes": image_sizes[k:k + 1]} if k < 2 else {}
            alone = alone_model(input_ids=torch.tensor([row]), **images).logits[0]
            assert (packed[at:at + len(row)] - alone).abs().max().item() <= 1e-5, k
            at += len(row)


def test_special_layers_change_the_output():
    """Same weights, different variants: the masks are really applied (outputs differ from plain LLaVA-OV)."""
    base = make_model("base")
    alternating = make_model("alternating")
    cross = make_model("alternating_cross")
    pixel_values, image_sizes, counts = image_inputs(base, [[32, 32]])
    ids = torch.tensor([[5, *[IMAGE] * counts[0], 6, 7]])
    inputs = {"input_ids": ids, "pixel_values": pixel_values, "image_sizes": image_sizes}
    with torch.no_grad():
        logits = {name: m(**inputs).logits for name, m in [("b", base), ("a", alternating), ("c", cross)]}
    # Before any special layer has run, position 0 is identical; afterwards the variants diverge.
    assert (logits["a"] - logits["b"]).abs().max().item() > 1e-3
    assert (logits["c"] - logits["a"]).abs().max().item() > 1e-3


def full_recompute_greedy(model, ids, mask, pixel_values, image_sizes, steps):
    """Greedy decoding without cache: one full forward over the whole sequence per step."""
    logits_per_step = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions(mask),
                pixel_values=pixel_values,
                image_sizes=image_sizes,
                use_cache=False,
            ).logits[:, -1]
        logits_per_step.append(logits)
        scores = logits.clone()
        # Same suppression as in generate: suppress_tokens, and eos through min_new_tokens.
        scores[:, [IMAGE, VIDEO, EOS]] = float("-inf")
        next_token = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
    return ids, logits_per_step


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_full_recompute(variant):
    model = make_model(variant, "sdpa")
    pixel_values, image_sizes, counts = image_inputs(model, [[32, 32], [32, 64]])
    ids, mask = pad_batch([[5, 6, *[IMAGE] * counts[0], 7], [*[IMAGE] * counts[1], 8, 9, 10, 11]], "left")
    steps = 6
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=[IMAGE, VIDEO],
            output_logits=True,
            return_dict_in_generate=True,
        )
    reference_ids, reference_logits = full_recompute_greedy(
        model, ids, mask, pixel_values, image_sizes, steps
    )
    assert torch.equal(generated.sequences, reference_ids)
    for step, (cached, full) in enumerate(zip(generated.logits, reference_logits)):
        assert (cached - full).abs().max().item() <= 1e-5, f"step {step}"


def test_static_cache_generation_matches_dynamic():
    """`generate` pre-builds 4D masks for static caches; the models hand it the 2D mask and build their own."""
    model = make_model("alternating_cross", "sdpa")
    pixel_values, image_sizes, counts = image_inputs(model, [[32, 32], [32, 64]])
    ids, mask = pad_batch([[5, 6, *[IMAGE] * counts[0], 7], [*[IMAGE] * counts[1], 8, 9, 10, 11]], "left")
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "suppress_tokens": [IMAGE, VIDEO],
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        dynamic = model.generate(**kwargs)
        static = model.generate(**kwargs, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(dynamic.logits, static.logits)) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_manual_decode_loop_uses_the_cache_record(variant):
    """Feeding only the new token with a cache: cached keys' modalities come from the cache record, and the new
    token's own row is used (the origin repo used row 0)."""
    model = make_model(variant, "eager")
    pixel_values, image_sizes, counts = image_inputs(model, [[32, 32]])
    # Starts with the image, so row 0 (image) differs from the new text token's row.
    prompt = torch.tensor([[*[IMAGE] * counts[0], 5, 6, 7]])
    with torch.no_grad():
        prefill = model(input_ids=prompt, pixel_values=pixel_values, image_sizes=image_sizes, use_cache=True)
        cache = prefill.past_key_values
        record = getattr(cache, MODALITY_CACHE_ATTRIBUTE)
        assert torch.equal(record, (prompt == IMAGE).long())
        new_token = torch.tensor([[9]])
        step = model(input_ids=new_token, past_key_values=cache, use_cache=True, output_attentions=True)
        full = model(
            input_ids=torch.cat([prompt, new_token], 1),
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            output_attentions=True,
        )
    assert (step.logits[:, -1] - full.logits[:, -1]).abs().max().item() <= 1e-5
    # The new (text) token's row at a special layer: which cached keys it sees.
    row = step.attentions[1][0, 0, 0] > 0
    modality = torch.cat([prompt, new_token], 1)[0] == IMAGE
    if variant == "alternating":
        assert torch.equal(row, ~modality)
    else:
        expected = modality.clone()
        expected[-1] = True
        assert torch.equal(row, expected)


def test_cache_without_modality_record_raises():
    from transformers.cache_utils import DynamicCache

    model = make_model("alternating")
    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        lm(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True)
        delattr(cache, MODALITY_CACHE_ATTRIBUTE)
        with pytest.raises(ValueError, match="no matching record"):
            lm(input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True)
        # The full-sequence form needs no record.
        lm(
            input_ids=torch.tensor([[8]]),
            past_key_values=cache,
            use_cache=True,
            modality_ids=torch.zeros(1, 4),
        )


def test_flash_attention_is_refused_for_special_layers():
    model = make_model("alternating")
    lm = model.model.language_model
    lm.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="cannot express"):
            lm._build_masks(
                None, torch.zeros(1, 3, 32), None, torch.arange(3)[None], torch.zeros(1, 3).long()
            )
    finally:
        lm.config._attn_implementation = "eager"


def test_text_model_generate_with_prompt_modality_ids():
    config = Qwen2AlternatingConfig(**{k: v for k, v in TEXT_CONFIG.items() if k != "model_type"})
    config.attention_variant = "alternating_cross"
    torch.manual_seed(0)
    model = AlternatingQwen2ForCausalLM(config).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    modality = torch.tensor([[0, 1, 1, 1, 0, 0]])  # e.g. embeddings of an image spliced in by the caller
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids, modality_ids=modality, max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
        reference = ids
        for _ in range(4):
            full_modality = torch.nn.functional.pad(modality, (0, reference.shape[1] - modality.shape[1]))
            logits = model(input_ids=reference, modality_ids=full_modality).logits[:, -1]
            logits[:, EOS] = float("-inf")  # min_new_tokens keeps generate from choosing eos
            reference = torch.cat([reference, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, reference)


@pytest.mark.parametrize("variant", [*VARIANTS, "base"])
def test_save_and_reload_keep_variant_and_logits(variant, tmp_path):
    model = make_model(variant)
    pixel_values, image_sizes, counts = image_inputs(model, [[32, 32]])
    inputs = {
        "input_ids": torch.tensor([[5, *[IMAGE] * counts[0], 6, 7]]),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == VARIANT_MODEL_TYPES[variant]
    assert read_model_type(tmp_path) == VARIANT_MODEL_TYPES[variant]
    assert AutoConfig.from_pretrained(tmp_path).model_type == VARIANT_MODEL_TYPES[variant]

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    if variant != "base":
        assert reloaded.config.text_config.attention_variant == variant
        assert type(reloaded.model.language_model).__name__ == "AlternatingQwen2Model"
    with torch.no_grad():
        before = model(**inputs).logits
        after = reloaded(**inputs).logits
    assert (before - after).abs().max().item() == 0.0


def test_text_model_registers_with_auto_classes(tmp_path):
    config = Qwen2AlternatingConfig(**{k: v for k, v in TEXT_CONFIG.items() if k != "model_type"})
    model = AlternatingQwen2ForCausalLM(config)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is AlternatingQwen2ForCausalLM
    assert reloaded.config.attention_variant == "alternating"


def test_composite_config_conversions():
    cross = LlavaQwenAlternatingCrossConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG))
    assert isinstance(cross.text_config, Qwen2AlternatingConfig)
    assert cross.text_config.attention_variant == "alternating_cross"
    with pytest.raises(ValueError, match="contradicts"):
        LlavaQwenAlternatingConfig(text_config={**TEXT_CONFIG, "attention_variant": "alternating_cross"})
    with pytest.raises(ValueError, match="must be one of"):
        Qwen2AlternatingConfig(attention_variant="sideways")

    base = LlavaOnevisionConfig(
        text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG), **COMPOSITE_KWARGS
    )
    for variant, model_type in VARIANT_MODEL_TYPES.items():
        built = build_composite_config(variant, base)
        assert built.model_type == model_type
        assert built.image_token_id == IMAGE
        assert built.text_config.hidden_size == 32
        assert built.vision_config.hidden_size == 32
        assert built.image_grid_pinpoints == COMPOSITE_KWARGS["image_grid_pinpoints"]
        if variant == "base":
            assert type(built.text_config).__name__ == "Qwen2Config"
        else:
            assert built.text_config.attention_variant == variant
    # From an alternating config back to base: the text config becomes plain Qwen2 again.
    back = build_composite_config("base", build_composite_config("alternating_cross", base))
    assert back.model_type == "llava_onevision"
    assert not hasattr(back.text_config, "attention_variant")


def test_check_variant():
    assert check_variant("auto", "llava_qwen_with_alternating_attn", force=False) == "alternating"
    assert check_variant("auto", "llava_qwen_with_alternating_cross_attn", force=False) == "alternating_cross"
    assert check_variant("base", "llava_onevision", force=False) == "base"
    assert check_variant("alternating_cross", "llava_qwen_with_alternating_cross_attn", force=False) == (
        "alternating_cross"
    )
    with pytest.raises(ValueError, match="llava_qwen_with_alternating_cross_attn"):
        check_variant("alternating", "llava_qwen_with_alternating_cross_attn", force=False)
    assert check_variant("alternating", "llava_qwen_with_alternating_cross_attn", force=True) == "alternating"
    with pytest.raises(ValueError, match="auto"):
        check_variant("auto", "qwen2", force=True)
    with pytest.raises(ValueError, match="one of"):
        check_variant("sideways", "llava_onevision", force=True)


def test_read_model_type_reads_only_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_qwen_with_alternating_attn"}))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")  # never opened
    assert read_model_type(tmp_path) == "llava_qwen_with_alternating_attn"
    assert read_model_type(tmp_path / "config.json") == "llava_qwen_with_alternating_attn"
    with pytest.raises(FileNotFoundError):
        read_model_type(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model_type"):
        read_model_type(tmp_path)


def test_plain_llava_onevision_checkpoint_loads_into_alternating_class(tmp_path):
    """LLaVA-OV weights share every name with the alternating composites."""
    base = make_model("base")
    base.save_pretrained(tmp_path)
    config = build_composite_config("alternating", LlavaOnevisionConfig.from_pretrained(tmp_path))
    model = LlavaQwenAlternatingForConditionalGeneration.from_pretrained(tmp_path, config=config)
    assert isinstance(model, LlavaQwenAlternatingForConditionalGeneration)
    assert not isinstance(model, LlavaQwenAlternatingCrossForConditionalGeneration)
    base_state = base.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, base_state[name]), name
    assert isinstance(base, LlavaOnevisionForConditionalGeneration)

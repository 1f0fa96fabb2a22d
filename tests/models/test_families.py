"""Family specs: lookup, plugin model types, and the vision / aligner / llm split of real parameters."""

from __future__ import annotations

import pytest
from transformers import AutoModelForImageTextToText

from arctic_vl.errors import ConfigError
from arctic_vl.models import families
from arctic_vl.models.families import (
    FAMILIES,
    family_for_model_type,
    get_family,
    part_of,
    register_model_type,
)


def test_get_family_unknown_lists_families():
    with pytest.raises(ConfigError) as err:
        get_family("llava_1_5")
    for name in FAMILIES:
        assert name in str(err.value)


def test_family_for_model_type_and_plugin_registration(monkeypatch):
    monkeypatch.setattr(families, "_MODEL_TYPES", dict(families._MODEL_TYPES))
    assert family_for_model_type("qwen2_5_vl") is FAMILIES["qwen2_5_vl"]
    assert family_for_model_type("zz_test_composite") is None
    register_model_type("zz_test_composite", "llava_onevision")
    assert family_for_model_type("zz_test_composite") is FAMILIES["llava_onevision"]
    register_model_type("zz_test_composite", "llava_onevision")  # idempotent
    with pytest.raises(ConfigError, match="already mapped"):
        register_model_type("zz_test_composite", "qwen2_vl")
    with pytest.raises(ConfigError, match="known families"):
        register_model_type("x", "nope")


def test_part_of_longest_prefix_wins():
    qwen = FAMILIES["qwen2_vl"]
    assert part_of(qwen, "model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert part_of(qwen, "model.visual.merger.mlp.0.weight") == "aligner"
    assert part_of(qwen, "model.language_model.layers.0.mlp.up_proj.weight") == "llm"
    assert part_of(qwen, "lm_head.weight") == "llm"
    assert part_of(FAMILIES["llava_next"], "model.image_newline") == "aligner"
    # A PEFT-wrapped name must be stripped by the caller first.
    assert part_of(qwen, "base_model.model.model.visual.merger.mlp.0.weight") is None
    assert part_of(qwen, "detection_head.query_embed.weight") is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_parameter_has_exactly_one_part(family, tiny_dirs):
    spec = get_family(family)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs[family])
    counts = {part: 0 for part in spec.parts}
    for name, _ in model.named_parameters():
        matches = {part for part, prefixes in spec.parts.items() if any(name.startswith(p) for p in prefixes)}
        assert matches, f"{family}: {name} belongs to no part"
        part = part_of(spec, name)
        assert part in matches
        counts[part] += 1
    # Every part is real (non-empty) for every family: freezing "aligner" must freeze something.
    assert all(n > 0 for n in counts.values()), counts
    if spec.is_qwen:
        merger = [n for n, _ in model.named_parameters() if ".merger." in n]
        assert merger and all(part_of(spec, n) == "aligner" for n in merger)
    elif family == "llava":  # LLaVA-1.5: no any-res tiles, so no image newline; the projector is the aligner
        names = dict(model.named_parameters())
        assert "model.image_newline" not in names
        projector = [n for n in names if n.startswith("model.multi_modal_projector.")]
        assert projector and all(part_of(spec, n) == "aligner" for n in projector)
    else:
        assert part_of(spec, "model.image_newline") == "aligner"
        assert "model.image_newline" in dict(model.named_parameters())

"""The six supported VLM families and how their parameters split into vision / aligner / llm.

Prefixes are the names `model.named_parameters()` yields for the transformers 5 classes (the
composite keeps its parts under `model.` with the head outside). They are checked by a test that
asserts every parameter of every family's tiny model lands in exactly one part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arctic_vl.errors import ConfigError
from arctic_vl.plugins import track_plugin_state

# What one image looks like in a rendered prompt before the processor expands it.
_LLAVA_PLACEHOLDER = "<image>"
_QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class FamilySpec:
    """A VLM family: its HF model type and class, its part prefixes and its image token."""

    name: str
    model_type: str
    model_class: str
    parts: dict[str, tuple[str, ...]]
    image_token: str
    # The placeholder the chat template renders for one image (Qwen wraps the pad token in
    # vision start/end markers); the processor expands `image_token` inside it.
    image_placeholder: str = _LLAVA_PLACEHOLDER
    # Extra tokenizer attributes the family's processor reads (tokenizer.image_token, ...).
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def is_qwen(self) -> bool:
        """True for the Qwen-VL families (flat patches, image_grid_thw, mRoPE)."""
        return self.name.startswith("qwen")


_LLAVA_PARTS = {
    "vision": ("model.vision_tower.",),
    "aligner": ("model.multi_modal_projector.", "model.image_newline"),
    "llm": ("model.language_model.", "lm_head."),
}
# LLaVA-1.5: the same composite without any-res tiles (so no image newline).
_LLAVA15_PARTS = {
    "vision": ("model.vision_tower.",),
    "aligner": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}
# The Qwen merger sits inside model.visual: the longer prefix wins in `part_of`.
_QWEN_PARTS = {
    "vision": ("model.visual.",),
    "aligner": ("model.visual.merger.",),
    "llm": ("model.language_model.", "lm_head."),
}
# Qwen3-VL also projects the deepstack features with their own mergers.
_QWEN3_PARTS = {
    "vision": ("model.visual.",),
    "aligner": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    "llm": ("model.language_model.", "lm_head."),
}
_LLAVA_TOKENS = {"image_token": "<image>", "video_token": "<video>"}
_QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

FAMILIES: dict[str, FamilySpec] = {
    "llava": FamilySpec(
        "llava", "llava", "LlavaForConditionalGeneration", _LLAVA15_PARTS, "<image>",
        _LLAVA_PLACEHOLDER, {"image_token": "<image>"},
    ),
    "llava_next": FamilySpec(
        "llava_next", "llava_next", "LlavaNextForConditionalGeneration", _LLAVA_PARTS, "<image>",
        _LLAVA_PLACEHOLDER, {"image_token": "<image>"},
    ),
    "llava_onevision": FamilySpec(
        "llava_onevision", "llava_onevision", "LlavaOnevisionForConditionalGeneration", _LLAVA_PARTS,
        "<image>", _LLAVA_PLACEHOLDER, _LLAVA_TOKENS,
    ),
    "qwen2_vl": FamilySpec(
        "qwen2_vl", "qwen2_vl", "Qwen2VLForConditionalGeneration", _QWEN_PARTS, "<|image_pad|>",
        _QWEN_PLACEHOLDER, _QWEN_TOKENS,
    ),
    "qwen2_5_vl": FamilySpec(
        "qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _QWEN_PARTS, "<|image_pad|>",
        _QWEN_PLACEHOLDER, _QWEN_TOKENS,
    ),
    "qwen3_vl": FamilySpec(
        "qwen3_vl", "qwen3_vl", "Qwen3VLForConditionalGeneration", _QWEN3_PARTS, "<|image_pad|>",
        _QWEN_PLACEHOLDER, _QWEN_TOKENS,
    ),
}

# model_type -> family name; plugins add their composite model types here.
_MODEL_TYPES: dict[str, str] = {spec.model_type: name for name, spec in FAMILIES.items()}


def get_family(name: str) -> FamilySpec:
    """The family called `name`; a ConfigError listing the known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}"
        ) from None


def family_for_model_type(model_type: str) -> FamilySpec | None:
    """The family an HF `config.model_type` belongs to, or None if no family claims it."""
    name = _MODEL_TYPES.get(model_type)
    return FAMILIES[name] if name is not None else None


def supported_model_types() -> list[str]:
    """Every HF `model_type` the engine trains: the families' own and those plugins registered."""
    return sorted(_MODEL_TYPES)


def unsupported_model_type(model_type: str | None, where: str) -> str:
    """The message for a checkpoint (`where`: its config.json) whose model_type no family claims."""
    return (f"{where} has model_type {model_type!r}, which arctic_vl cannot train; supported model types: "
            f"{', '.join(supported_model_types())} (plugins add model types with register_model_type)")


def _restore_model_types(saved: dict[str, str]) -> None:
    _MODEL_TYPES.clear()
    _MODEL_TYPES.update(saved)


# a plugin that fails to load has its model types undone with the rest of what it registered
track_plugin_state(lambda: dict(_MODEL_TYPES), _restore_model_types)


def register_model_type(model_type: str, family: str) -> None:
    """Map a plugin's own composite `model_type` onto one of the families."""
    spec = get_family(family)
    current = _MODEL_TYPES.get(model_type)
    if current is not None and current != spec.name:
        raise ConfigError(f"model type {model_type!r} is already mapped to family {current!r}")
    _MODEL_TYPES[model_type] = spec.name


def part_of(spec: FamilySpec, param_name: str) -> str | None:
    """The part (vision / aligner / llm) owning `param_name`, by longest matching prefix.

    The caller strips wrapper prefixes such as PEFT's `base_model.model.` first.
    """
    best: tuple[int, str | None] = (-1, None)
    for part, prefixes in spec.parts.items():
        for prefix in prefixes:
            if param_name.startswith(prefix) and len(prefix) > best[0]:
                best = (len(prefix), part)
    return best[1]

"""Variant names, checkpoint checks and composite configs for the alternating-attention project.

A *variant* names a model family: `alternating` (within-modality special layers), `alternating_cross`
(cross-modality special layers) or `base` (plain LLaVA-OneVision). `auto` in a request means "whatever the
checkpoint is". Everything here reads configs only: no weights, no network, and no torch import at module load
(the transformers imports happen inside the functions that need them), so `arctic_vl validate` stays fast.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

__all__ = [
    "REQUESTABLE_VARIANTS",
    "VARIANT_MODEL_TYPES",
    "build_composite_config",
    "check_variant",
    "read_model_type",
    "variant_of_model_type",
]

#: variant -> `config.model_type` of its composite.
VARIANT_MODEL_TYPES: dict[str, str] = {
    "alternating": "llava_qwen_with_alternating_attn",
    "alternating_cross": "llava_qwen_with_alternating_cross_attn",
    "base": "llava_onevision",
}

#: What a config may ask for.
REQUESTABLE_VARIANTS: tuple[str, ...] = ("auto", *VARIANT_MODEL_TYPES)


def variant_of_model_type(model_type: str) -> str | None:
    """The variant whose composite has this `model_type`, or `None` for any other model type."""
    for variant, known in VARIANT_MODEL_TYPES.items():
        if known == model_type:
            return variant
    return None


def check_variant(requested: str, checkpoint_model_type: str, force: bool) -> str:
    """Resolve a requested variant against a checkpoint's `model_type`.

    Args:
        requested: `auto`, `alternating`, `alternating_cross` or `base`.
        checkpoint_model_type: `model_type` from the checkpoint's `config.json` (see [`read_model_type`]).
        force: accept a mismatch and return `requested` anyway (the caller then builds the requested class and
            loads whatever weights match).

    Returns:
        The resolved variant (never `auto`).

    Raises:
        ValueError: unknown `requested`; `auto` with a checkpoint of no known variant (even with `force`: there is
            nothing to resolve to); an explicit variant that contradicts the checkpoint, unless `force`.
    """
    if requested not in REQUESTABLE_VARIANTS:
        raise ValueError(f"variant must be one of {list(REQUESTABLE_VARIANTS)}, got {requested!r}")
    found = variant_of_model_type(checkpoint_model_type)
    known = ", ".join(f"{v} -> {t}" for v, t in VARIANT_MODEL_TYPES.items())
    if requested == "auto":
        if found is None:
            raise ValueError(
                f"variant 'auto' cannot be resolved: the checkpoint's model_type {checkpoint_model_type!r} is none "
                f"of the known composites ({known}). Name the variant explicitly (with force: true to build it "
                "from this checkpoint)."
            )
        return found
    if found == requested:
        return requested
    if force:
        return requested
    raise ValueError(
        f"variant {requested!r} expects a checkpoint with model_type {VARIANT_MODEL_TYPES[requested]!r}, but the "
        f"checkpoint has model_type {checkpoint_model_type!r}"
        + (f" (variant {found!r})" if found else "")
        + ". Use variant: auto to follow the checkpoint, or force: true to build the requested variant anyway."
    )


def read_model_type(path: str | Path) -> str:
    """`model_type` of a checkpoint, read from its `config.json` alone (no weights are opened).

    Args:
        path: a checkpoint directory or the path of a `config.json`.
    """
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json at {config_file}")
    from arctic_vl import JsonTextError, parse_json

    try:
        data = parse_json(config_file.read_bytes())
    except JsonTextError as e:
        raise ValueError(f"{config_file}: {e}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{config_file} has no 'model_type' field")
    return model_type


def build_composite_config(
    variant: str,
    base_config: PreTrainedConfig | dict[str, Any],
    *,
    text_config: PreTrainedConfig | dict[str, Any] | None = None,
) -> PreTrainedConfig:
    """Build the composite config of `variant` from a LLaVA-OneVision-like config.

    Every field of `base_config` (vision config, image token ids, grid pinpoints, projector settings, ...) is
    kept; only the class (hence `model_type`) and the language-model config change.

    Args:
        variant: `alternating`, `alternating_cross` or `base`.
        base_config: a LLaVA-OneVision config or one of the alternating composites (or its dict).
        text_config: replaces `base_config.text_config`, e.g. the config of a Qwen2 backbone to initialise from.

    Returns:
        A `LlavaQwenAlternatingConfig`, `LlavaQwenAlternatingCrossConfig` or `LlavaOnevisionConfig`.
    """
    # Imported here: registering the config classes imports transformers (and torch).
    from transformers import LlavaOnevisionConfig, PreTrainedConfig

    from .configuration_alternating import LlavaQwenAlternatingConfig, LlavaQwenAlternatingCrossConfig

    classes = {
        "alternating": LlavaQwenAlternatingConfig,
        "alternating_cross": LlavaQwenAlternatingCrossConfig,
        "base": LlavaOnevisionConfig,
    }
    if variant not in classes:
        raise ValueError(f"variant must be one of {sorted(classes)} to build a config, got {variant!r}")

    fields = (
        base_config.to_dict() if isinstance(base_config, PreTrainedConfig) else copy.deepcopy(base_config)
    )
    if "vision_config" not in fields or ("text_config" not in fields and text_config is None):
        raise ValueError(
            "base_config must be a LLaVA-OneVision-like config with vision_config and text_config"
        )
    if text_config is not None:
        fields["text_config"] = (
            text_config.to_dict() if isinstance(text_config, PreTrainedConfig) else copy.deepcopy(text_config)
        )
    # The class decides these; stale values would contradict it.
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)

    text_fields = dict(fields["text_config"] or {})
    if variant == "base":
        # A plain Qwen2 language model: drop the alternating bits if the source was an alternating composite.
        text_fields.pop("attention_variant", None)
        text_fields["model_type"] = "qwen2"
    else:
        # The composite class assigns its own variant; a source variant must not leak into a different one.
        text_fields.pop("attention_variant", None)
    fields["text_config"] = text_fields
    return classes[variant].from_dict(fields)

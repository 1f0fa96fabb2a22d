"""Alternating attention for LLaVA-OneVision / Qwen2 (arctic_vl project `alternating_attn`).

Import-light: importing the package loads neither torch nor transformers (nor arctic_vl). The public names are
resolved lazily from their modules on first access:

* configs: `Qwen2AlternatingConfig`, `LlavaQwenAlternatingConfig`, `LlavaQwenAlternatingCrossConfig`,
  `alternating_layer_indices` (configuration_alternating);
* models: `AlternatingQwen2Model`, `AlternatingQwen2ForCausalLM`, `LlavaQwenAlternating[Cross]Model`,
  `LlavaQwenAlternating[Cross]ForConditionalGeneration`, `composite_model_class`, `register_auto`
  (modeling_alternating; importing it registers the Auto classes);
* variants: `VARIANT_MODEL_TYPES`, `check_variant`, `read_model_type`, `build_composite_config` (variants);
* weights: `init_from_backbone`, `load_backbone_state_dict`, `WeightReport` (backbone).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "Qwen2AlternatingConfig": "configuration_alternating",
    "LlavaQwenAlternatingConfig": "configuration_alternating",
    "LlavaQwenAlternatingCrossConfig": "configuration_alternating",
    "alternating_layer_indices": "configuration_alternating",
    "AlternatingQwen2Model": "modeling_alternating",
    "AlternatingQwen2ForCausalLM": "modeling_alternating",
    "LlavaQwenAlternatingModel": "modeling_alternating",
    "LlavaQwenAlternatingCrossModel": "modeling_alternating",
    "LlavaQwenAlternatingForConditionalGeneration": "modeling_alternating",
    "LlavaQwenAlternatingCrossForConditionalGeneration": "modeling_alternating",
    "composite_model_class": "modeling_alternating",
    "register_auto": "modeling_alternating",
    "VARIANT_MODEL_TYPES": "variants",
    "check_variant": "variants",
    "read_model_type": "variants",
    "build_composite_config": "variants",
    "init_from_backbone": "backbone",
    "load_backbone_state_dict": "backbone",
    "WeightReport": "backbone",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

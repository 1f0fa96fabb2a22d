"""Configurations for Qwen2 / LLaVA-OneVision with alternating attention.

Two levels:

* [`Qwen2AlternatingConfig`] (`model_type="qwen2_alternating"`): a [`Qwen2Config`] plus `attention_variant`, the
  language-model config. Which layers are "special" is a fixed schedule, see [`alternating_layer_indices`].
* [`LlavaQwenAlternatingConfig`] (`llava_qwen_with_alternating_attn`) and [`LlavaQwenAlternatingCrossConfig`]
  (`llava_qwen_with_alternating_cross_attn`): [`LlavaOnevisionConfig`] composites whose `text_config` is always a
  [`Qwen2AlternatingConfig`] with the variant the composite's model type names. The variant is therefore encoded in
  `config.json` twice (the composite `model_type` and `text_config.attention_variant`) and the two must agree.

The configs are registered with `AutoConfig` when this module is imported: the composite configs resolve their
`text_config` through it, and `AutoConfig.from_pretrained` on a saved checkpoint needs the model types to be known.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, LlavaOnevisionConfig, PreTrainedConfig, Qwen2Config

__all__ = [
    "ATTENTION_VARIANTS",
    "LlavaQwenAlternatingConfig",
    "LlavaQwenAlternatingCrossConfig",
    "Qwen2AlternatingConfig",
    "alternating_layer_indices",
    "register_configs",
]

#: The two attention patterns of the special layers (see [`Qwen2AlternatingConfig`]).
ATTENTION_VARIANTS: tuple[str, ...] = ("alternating", "alternating_cross")


def alternating_layer_indices(num_hidden_layers: int) -> list[int]:
    """Indices (0-based) of the layers that use the special modality mask.

    The schedule is fixed by the design: layer `idx` is special when `idx` is odd and is not the last layer; every
    other layer (even layers and the last one) uses the ordinary causal mask.

    >>> alternating_layer_indices(6)
    [1, 3]
    >>> alternating_layer_indices(4)
    [1]
    """
    return [idx for idx in range(num_hidden_layers) if idx % 2 == 1 and idx != num_hidden_layers - 1]


def _check_variant(variant: Any) -> None:
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(
            f"`attention_variant` must be one of {list(ATTENTION_VARIANTS)}, got {variant!r}. "
            "(A plain LLaVA-OneVision without special layers is the `base` variant: use LlavaOnevisionConfig.)"
        )


class Qwen2AlternatingConfig(Qwen2Config):
    r"""
    Configuration of a Qwen2 language model with alternating (modality-aware) attention.

    Every field of [`Qwen2Config`] applies, plus:

    attention_variant (`str`, *optional*, defaults to `"alternating"`):
        The mask of the special layers (odd, non-last), ANDed with the causal and padding masks:

        - `"alternating"`: within-modality, a query may see a key only if both are text or both are image tokens;
        - `"alternating_cross"`: cross-modality, a query may see a key only if their modalities differ, plus itself.

    Example:

    ```python
    >>> from alternating_attn.configuration_alternating import Qwen2AlternatingConfig
    >>> config = Qwen2AlternatingConfig(hidden_size=32, num_hidden_layers=4, attention_variant="alternating_cross")
    >>> config.alternating_layers
    [1]
    ```
    """

    model_type = "qwen2_alternating"

    attention_variant: str = "alternating"

    def __post_init__(self, **kwargs):
        _check_variant(self.attention_variant)
        super().__post_init__(**kwargs)

    @property
    def alternating_layers(self) -> list[int]:
        """Indices of the layers that use the special mask (see [`alternating_layer_indices`])."""
        return alternating_layer_indices(self.num_hidden_layers)


def _as_alternating_text_config(text_config: Any, variant: str) -> Qwen2AlternatingConfig:
    """Turn whatever a composite config received as `text_config` into a [`Qwen2AlternatingConfig`].

    A plain Qwen2 text config (dict or config object, e.g. from a LLaVA-OneVision checkpoint or a backbone) is
    converted and gets the composite's variant. An explicit, different `attention_variant` is an error: silently
    overriding it would make `config.json` lie about what the model computes.
    """
    if isinstance(text_config, Qwen2AlternatingConfig):
        if text_config.attention_variant != variant:
            raise ValueError(
                f"text_config.attention_variant={text_config.attention_variant!r} contradicts the composite's "
                f"variant {variant!r}."
            )
        return text_config
    if text_config is None:
        fields: dict[str, Any] = {}
    elif isinstance(text_config, PreTrainedConfig):
        fields = text_config.to_dict()
    elif isinstance(text_config, dict):
        fields = dict(text_config)
    else:
        raise TypeError(f"`text_config` must be a dict, a PreTrainedConfig or None, got {type(text_config)}")
    source_type = fields.pop("model_type", None)
    if source_type not in (None, "qwen2", Qwen2AlternatingConfig.model_type):
        raise ValueError(
            f"The alternating-attention composites need a Qwen2 language model, got text_config of type "
            f"{source_type!r}."
        )
    requested = fields.pop("attention_variant", variant)
    if requested != variant:
        raise ValueError(
            f"text_config.attention_variant={requested!r} contradicts the composite's variant {variant!r}."
        )
    # Keys that `to_dict` writes but that are bookkeeping, not constructor arguments.
    for key in ("transformers_version", "architectures"):
        fields.pop(key, None)
    return Qwen2AlternatingConfig(**fields, attention_variant=variant)


class LlavaQwenAlternatingConfig(LlavaOnevisionConfig):
    r"""
    LLaVA-OneVision composite whose language model uses within-modality alternating attention
    (`model_type="llava_qwen_with_alternating_attn"`).

    Takes every argument of [`LlavaOnevisionConfig`]. `text_config` may be a Qwen2 config or dict (it is converted to
    a [`Qwen2AlternatingConfig`] with this composite's variant) or a [`Qwen2AlternatingConfig`] whose variant
    matches.
    """

    model_type = "llava_qwen_with_alternating_attn"
    #: Fixed by the model type, not a serialised field.
    attention_variant: ClassVar[str] = "alternating"

    def __post_init__(self, **kwargs):
        # Convert before the parent resolves sub-configs: the parent would otherwise build a plain Qwen2Config from
        # the default `qwen2` sub-config spec.
        self.text_config = _as_alternating_text_config(self.text_config, self.attention_variant)
        super().__post_init__(**kwargs)


class LlavaQwenAlternatingCrossConfig(LlavaQwenAlternatingConfig):
    r"""
    LLaVA-OneVision composite whose language model uses cross-modality alternating attention
    (`model_type="llava_qwen_with_alternating_cross_attn"`). See [`LlavaQwenAlternatingConfig`].
    """

    model_type = "llava_qwen_with_alternating_cross_attn"
    attention_variant: ClassVar[str] = "alternating_cross"


def register_configs() -> None:
    """Register the three config classes with `AutoConfig` (idempotent)."""
    for config_class in (Qwen2AlternatingConfig, LlavaQwenAlternatingConfig, LlavaQwenAlternatingCrossConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


register_configs()

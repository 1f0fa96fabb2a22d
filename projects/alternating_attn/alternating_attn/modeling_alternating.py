"""Qwen2 and LLaVA-OneVision models with alternating (modality-aware) attention.

Layer `idx` of the language model uses the ordinary causal (+ padding) mask when `idx` is even or is the last
layer. The other layers ("special" layers, see [`alternating_layer_indices`]) AND that mask with a modality rule:

* `alternating` (within-modality): query `q` may see key `k` only if `modality[q] == modality[k]`;
* `alternating_cross` (cross-modality): query `q` may see key `k` only if `modality[q] != modality[k]` or `q == k`.

Modality ids are 1 for image-feature tokens (every position holding the image token id, which LLaVA-OneVision
expands to the image features *and* the row newlines) and 0 for text and padding. A text-only sample therefore gets
exactly the causal mask on `alternating` layers, and on `alternating_cross` layers each text query sees only itself
(that is the definition, kept on purpose).

KV cache
--------
With a cache, the special mask of the new tokens must use *their own* rows (absolute query positions
`past + i`) against the modality of *every* cached key. The language model therefore always works with the
modality ids of the whole sequence (cached keys + new tokens), obtained in one of two ways:

1. Stateless (what `generate` uses): `modality_ids` covers the full sequence, `past_seen + new` tokens. The
   composite's `prepare_inputs_for_generation` recomputes it from the full `input_ids` (`input_ids ==
   image_token_id`) at every step, so it stays right under beam reordering or cache cropping.
2. Incremental (manual decode loops): `modality_ids` (or, in the composite, `input_ids`) covers only the new tokens;
   the modalities of the cached keys are read back from the cache object, where every forward pass that receives a
   cache records the full modality row (`cache.alternating_modality_ids`). Passing a cache that has no such record
   (a cache filled by another model) with a non-empty past raises instead of guessing.

Attention backends: `eager`, `sdpa` and `flex_attention` receive the special mask. Backends that only take a
padding mask (flash attention) cannot express it, so building a special layer with them raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import (
    and_masks,
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionPreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_alternating import (
    ATTENTION_VARIANTS,
    LlavaQwenAlternatingConfig,
    LlavaQwenAlternatingCrossConfig,
    Qwen2AlternatingConfig,
    alternating_layer_indices,
    register_configs,
)

__all__ = [
    "MODALITY_CACHE_ATTRIBUTE",
    "AlternatingQwen2ForCausalLM",
    "AlternatingQwen2Model",
    "LlavaQwenAlternatingCrossForConditionalGeneration",
    "LlavaQwenAlternatingCrossModel",
    "LlavaQwenAlternatingForConditionalGeneration",
    "LlavaQwenAlternatingModel",
    "composite_model_class",
    "modality_mask_function",
    "register_auto",
]

#: Attribute of a `Cache` object under which the language model records the modality ids (batch, seen tokens) of
#: the keys it holds.
MODALITY_CACHE_ATTRIBUTE = "alternating_modality_ids"

IMAGE_MODALITY = 1
TEXT_MODALITY = 0


def modality_mask_function(modality_ids: torch.Tensor, variant: str) -> Callable:
    """The modality rule of the special layers as a `masking_utils` mask function.

    Args:
        modality_ids (`torch.Tensor` of shape `(batch_size, total_length)`):
            Modality of every position of the sequence, cached keys first (1 image, 0 text/padding).
        variant (`str`):
            `"alternating"` or `"alternating_cross"`.

    Returns:
        A function `(batch_idx, head_idx, q_idx, kv_idx) -> bool` to be ANDed with the causal mask. `q_idx` and
        `kv_idx` are absolute positions, so query rows of new tokens under a cache are `past + i` (not row 0).
    """
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"Unknown attention variant {variant!r}; expected one of {list(ATTENTION_VARIANTS)}")
    last = modality_ids.shape[-1] - 1

    def within_modality(batch_idx, head_idx, q_idx, kv_idx):
        # Static caches ask about key slots past the sequence; those are masked by causality anyway, the clamp
        # only keeps the lookup in range.
        return modality_ids[batch_idx, q_idx] == modality_ids[batch_idx, kv_idx.clamp(max=last)]

    def cross_modality(batch_idx, head_idx, q_idx, kv_idx):
        differs = modality_ids[batch_idx, q_idx] != modality_ids[batch_idx, kv_idx.clamp(max=last)]
        return differs | (q_idx == kv_idx)

    return within_modality if variant == "alternating" else cross_modality


def _packed_segments(attention_mask: torch.Tensor | None, past_key_values: Cache | None, position_ids: torch.Tensor,
                     batch_size: int) -> torch.Tensor | None:
    """(batch, length) sample index of every token of a packed batch (no padding mask, no cache, 2-D positions
    restarting per sample); None for an ordinary batch."""
    if attention_mask is not None or past_key_values is not None or position_ids.dim() != 2:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch_size, -1))


def _same_segment(segments: torch.Tensor) -> Callable:
    """Mask function: query and key belong to the same packed sample (absolute indices)."""
    last = segments.shape[-1] - 1

    def same(batch_idx, head_idx, q_idx, kv_idx):
        return segments[batch_idx, q_idx] == segments[batch_idx, kv_idx.clamp(max=last)]

    return same


class AlternatingQwen2Model(Qwen2Model):
    """Qwen2 decoder whose odd, non-last layers use a modality-aware mask.

    Same parameters (names and shapes) as [`Qwen2Model`]: a Qwen2 checkpoint loads into it unchanged. Only the
    masks differ. `forward` takes one extra argument, `modality_ids` (see the module docstring for the cache
    contract).
    """

    config_class = Qwen2AlternatingConfig
    config: Qwen2AlternatingConfig

    def __init__(self, config: Qwen2AlternatingConfig):
        super().__init__(config)
        self.alternating_layers = frozenset(alternating_layer_indices(config.num_hidden_layers))

    def _full_modality_ids(
        self,
        modality_ids: torch.Tensor | None,
        past_key_values: Cache | None,
        batch_size: int,
        query_length: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Modality ids of cached keys + new tokens, shape `(batch_size, past_seen + query_length)`.

        Accepts full-sequence ids or new-token ids (then the cache's record supplies the past), and records the
        result on the cache for the next call.
        """
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past_seen + query_length
        if modality_ids is None:
            # No information: every new token is text (what a text-only language model sees).
            modality_ids = torch.zeros(batch_size, query_length, dtype=torch.long, device=device)
        modality_ids = modality_ids.to(device=device, dtype=torch.long)
        if modality_ids.dim() != 2 or modality_ids.shape[0] != batch_size:
            raise ValueError(
                f"`modality_ids` must have shape (batch_size={batch_size}, length), got {tuple(modality_ids.shape)}"
            )

        if modality_ids.shape[1] == total:
            full = modality_ids
        elif modality_ids.shape[1] == query_length:
            recorded = getattr(past_key_values, MODALITY_CACHE_ATTRIBUTE, None)
            if past_seen == 0:
                full = modality_ids
            elif recorded is None or recorded.shape[1] < past_seen or recorded.shape[0] != batch_size:
                raise ValueError(
                    f"The cache holds {past_seen} tokens but carries no matching record of their modalities "
                    f"(`{MODALITY_CACHE_ATTRIBUTE}`: "
                    f"{None if recorded is None else tuple(recorded.shape)}). Pass `modality_ids` for the whole "
                    "sequence (cached + new tokens) instead."
                )
            else:
                # A cropped cache (assisted decoding) keeps a longer record: only its first `past_seen` count.
                full = torch.cat([recorded[:, :past_seen].to(device), modality_ids], dim=1)
        else:
            raise ValueError(
                f"`modality_ids` has length {modality_ids.shape[1]}; expected {query_length} (new tokens) or "
                f"{total} (cached {past_seen} + new {query_length})."
            )

        if past_key_values is not None:
            setattr(past_key_values, MODALITY_CACHE_ATTRIBUTE, full.detach())
        return full

    def _build_masks(
        self,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        past_key_values: Cache | None,
        position_ids: torch.Tensor,
        full_modality_ids: torch.Tensor,
    ) -> dict[tuple[str, bool], torch.Tensor | None]:
        """Masks keyed by `(layer_type, is_special)`; only the combinations the model uses are built."""
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() == 4):
            raise ValueError(
                f"{type(self).__name__} builds its masks from a 2D padding mask and the modality ids; a prepared "
                "4D or per-layer-type mask cannot carry the alternating pattern. Pass the 2D `attention_mask`."
            )
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
        }
        factories = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        modality_rule = modality_mask_function(full_modality_ids, self.config.attention_variant)
        special_kwargs = mask_kwargs
        segments = _packed_segments(attention_mask, past_key_values, position_ids, inputs_embeds.shape[0])
        if segments is not None:
            # Packed rows: transformers (5.23) hands mask functions of packed sequences WITHIN-sample positions,
            # which would look the modalities up at another sample's tokens. The special masks are built from
            # absolute indices instead (no position_ids), with the samples kept apart by their own rule.
            modality_rule = and_masks(modality_rule, _same_segment(segments))
            special_kwargs = {**mask_kwargs, "position_ids": None}
        masks: dict[tuple[str, bool], torch.Tensor | None] = {}
        for idx in range(self.config.num_hidden_layers):
            layer_type = self.config.layer_types[idx]
            special = idx in self.alternating_layers
            if (layer_type, special) in masks:
                continue
            if layer_type not in factories:
                raise ValueError(f"Unsupported layer type {layer_type!r} in {type(self).__name__}")
            if not special:
                masks[(layer_type, special)] = factories[layer_type](**mask_kwargs)
                continue
            mask = factories[layer_type](**special_kwargs, and_mask_function=modality_rule)
            # Backends such as flash attention turn any mask into a padding mask (2D or None): the modality rule
            # would be dropped without a word, so refuse.
            if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() != 4):
                raise ValueError(
                    f"attn_implementation={self.config._attn_implementation!r} cannot express the alternating "
                    "mask; use 'eager', 'sdpa' or 'flex_attention'."
                )
            masks[(layer_type, special)] = mask
        return masks

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        modality_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        Args:
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache:
                As in [`Qwen2Model.forward`]. `attention_mask` must be the 2D padding mask (1 keep, 0 pad).
            modality_ids (`torch.LongTensor` of shape `(batch_size, length)`, *optional*):
                1 for image-feature tokens, 0 for text and padding. `length` is either the number of new tokens
                or the whole sequence (cached + new); see the module docstring. `None` means all new tokens are
                text.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        batch_size, query_length = inputs_embeds.shape[:2]
        # Read before any layer writes to the cache: the length of the past is needed for both.
        full_modality_ids = self._full_modality_ids(
            modality_ids, past_key_values, batch_size, query_length, inputs_embeds.device
        )
        if position_ids is None:
            past_seen = full_modality_ids.shape[1] - query_length
            position_ids = (torch.arange(query_length, device=inputs_embeds.device) + past_seen).unsqueeze(0)

        masks = self._build_masks(
            attention_mask, inputs_embeds, past_key_values, position_ids, full_modality_ids
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            layer_mask = masks[(self.config.layer_types[idx], idx in self.alternating_layers)]
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=layer_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
        )


def _pass_2d_mask_through(self, config, inputs_embeds, attention_mask, past_key_values, *args, **kwargs):
    """`create_masks_for_generate` override: hand the 2D mask to the model, which builds its own masks.

    `generate` pre-builds 4D masks for compilable (static) caches; those could not carry the modality rule.
    """
    return attention_mask


class AlternatingQwen2ForCausalLM(Qwen2ForCausalLM):
    """[`AlternatingQwen2Model`] with a language-modelling head.

    `forward(..., modality_ids=...)` is forwarded to the model. In `generate`, a prompt-length `modality_ids` is
    extended with zeros (generated tokens are text) and passed for the whole sequence at every step.
    """

    config_class = Qwen2AlternatingConfig
    config: Qwen2AlternatingConfig

    def __init__(self, config: Qwen2AlternatingConfig):
        # Skip Qwen2ForCausalLM.__init__, which would first build (and randomly initialise) a plain Qwen2Model.
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = AlternatingQwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    create_masks_for_generate = _pass_2d_mask_through

    def prepare_inputs_for_generation(self, input_ids, *args, modality_ids=None, **kwargs):
        """Qwen2's inputs for a generation step, plus `modality_ids` padded as text to the input length."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if modality_ids is not None and input_ids is not None and input_ids.shape[1] > 0:
            missing = input_ids.shape[1] - modality_ids.shape[1]
            if missing > 0:
                modality_ids = nn.functional.pad(modality_ids, (0, missing), value=TEXT_MODALITY)
            model_inputs["modality_ids"] = modality_ids[:, : input_ids.shape[1]]
        return model_inputs


class LlavaQwenAlternatingModel(LlavaOnevisionModel):
    """LLaVA-OneVision base model whose language model is an [`AlternatingQwen2Model`].

    Computes `modality_ids` from `input_ids == image_token_id` (from the image-token embedding when only
    `inputs_embeds` are given) and passes them to the language model; an explicit `modality_ids` wins.
    """

    config_class = LlavaQwenAlternatingConfig
    config: LlavaQwenAlternatingConfig

    def modality_ids_from_inputs(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor | None
    ) -> torch.LongTensor:
        """1 where the sequence holds the image token (features and newlines after expansion), else 0."""
        if input_ids is not None:
            return (input_ids == self.config.image_token_id).long()
        special_image_mask, _ = self.get_placeholder_mask(None, inputs_embeds=inputs_embeds)
        return special_image_mask.squeeze(-1).long()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *args,
        inputs_embeds: torch.FloatTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        **kwargs,
    ):
        """As [`LlavaOnevisionModel.forward`], plus `modality_ids` (see [`AlternatingQwen2Model.forward`])."""
        if modality_ids is None and (input_ids is not None or inputs_embeds is not None):
            modality_ids = self.modality_ids_from_inputs(input_ids, inputs_embeds)
        # The parent forwards unknown kwargs to the language model.
        return super().forward(
            input_ids, *args, inputs_embeds=inputs_embeds, modality_ids=modality_ids, **kwargs
        )


class LlavaQwenAlternatingForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with a within-modality alternating-attention Qwen2 (`llava_qwen_with_alternating_attn`).

    Same parameter names as [`LlavaOnevisionForConditionalGeneration`], so LLaVA-OneVision checkpoints load into it.
    """

    config_class = LlavaQwenAlternatingConfig
    config: LlavaQwenAlternatingConfig
    base_model_class: type[LlavaOnevisionModel] = LlavaQwenAlternatingModel

    def __init__(self, config: LlavaQwenAlternatingConfig):
        # Skip the parent's __init__, which would build a plain LlavaOnevisionModel first.
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    create_masks_for_generate = _pass_2d_mask_through

    def prepare_inputs_for_generation(self, input_ids, *args, past_key_values=None, **kwargs):
        """Adds `modality_ids` recomputed from the full `input_ids` (the stateless cache path)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, past_key_values=past_key_values, **kwargs
        )
        if input_ids is None or input_ids.shape[1] == 0 or model_inputs.get("input_ids") is None:
            # Prompt given as embeddings: the model derives the modalities from them (and the cache record).
            return model_inputs
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        new_tokens = model_inputs["input_ids"].shape[1]
        full = (input_ids == self.config.image_token_id).long()
        if full.shape[1] == past_seen + new_tokens:
            model_inputs["modality_ids"] = full
        # Otherwise (e.g. the prompt was embeddings and input_ids holds only generated tokens) leave it to the
        # model, which combines the new tokens with the cache's record.
        return model_inputs


class LlavaQwenAlternatingCrossModel(LlavaQwenAlternatingModel):
    """[`LlavaQwenAlternatingModel`] for the cross-modality variant."""

    config_class = LlavaQwenAlternatingCrossConfig
    config: LlavaQwenAlternatingCrossConfig


class LlavaQwenAlternatingCrossForConditionalGeneration(LlavaQwenAlternatingForConditionalGeneration):
    """LLaVA-OneVision with a cross-modality alternating-attention Qwen2
    (`llava_qwen_with_alternating_cross_attn`)."""

    config_class = LlavaQwenAlternatingCrossConfig
    config: LlavaQwenAlternatingCrossConfig
    base_model_class = LlavaQwenAlternatingCrossModel


_COMPOSITES: dict[str, tuple[type, type, type]] = {
    "alternating": (
        LlavaQwenAlternatingConfig,
        LlavaQwenAlternatingModel,
        LlavaQwenAlternatingForConditionalGeneration,
    ),
    "alternating_cross": (
        LlavaQwenAlternatingCrossConfig,
        LlavaQwenAlternatingCrossModel,
        LlavaQwenAlternatingCrossForConditionalGeneration,
    ),
    "base": (LlavaOnevisionConfig, LlavaOnevisionModel, LlavaOnevisionForConditionalGeneration),
}


def composite_model_class(variant: str) -> type[LlavaOnevisionForConditionalGeneration]:
    """The `...ForConditionalGeneration` class of a variant (`alternating`, `alternating_cross` or `base`)."""
    if variant not in _COMPOSITES:
        raise ValueError(f"Unknown variant {variant!r}; expected one of {sorted(_COMPOSITES)}")
    return _COMPOSITES[variant][2]


def _share_llava_onevision_weight_layout() -> None:
    """Give the composites LLaVA-OneVision's checkpoint key conversion.

    transformers 5 writes LLaVA-OneVision checkpoints in the original key layout (`language_model.model.*`,
    `vision_tower.*`, ...) and renames them on load, keyed by `model_type`. Registering the same renaming for our
    model types makes the two families read each other's files (a LLaVA-OneVision checkpoint loads into an
    alternating class with `from_pretrained`) and keeps our files in the layout other tools expect.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers without the registry: nothing to share
        return
    for config_class in (LlavaQwenAlternatingConfig, LlavaQwenAlternatingCrossConfig):
        mapping = get_checkpoint_conversion_mapping(LlavaOnevisionConfig.model_type)
        if mapping:
            register_checkpoint_conversion_mapping(config_class.model_type, mapping, overwrite=True)


def register_auto() -> None:
    """Register configs and models with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` (text model) and
    `AutoModelForImageTextToText` (composites), and share LLaVA-OneVision's checkpoint key layout. Idempotent;
    called when this module is imported."""
    register_configs()
    _share_llava_onevision_weight_layout()
    AutoModel.register(Qwen2AlternatingConfig, AlternatingQwen2Model, exist_ok=True)
    AutoModelForCausalLM.register(Qwen2AlternatingConfig, AlternatingQwen2ForCausalLM, exist_ok=True)
    for variant in ("alternating", "alternating_cross"):
        config_class, model_class, generation_class = _COMPOSITES[variant]
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, generation_class, exist_ok=True)


register_auto()

"""The SwiftKV machinery shared by the Llama and Qwen2 flavours.

The model files (``modeling_llama_swiftkv.py``, ``modeling_qwen2_swiftkv.py``) combine these mixins with the
teacher classes of transformers; this module holds what is identical between them:

* :class:`SwiftKVAttentionMixin`: the teacher attention plus ``q_proj_swiftkv`` (every layer ``>= M``) and
  ``k_proj_swiftkv``/``v_proj_swiftkv`` (the first layer of each group); runs the teacher's forward unless it is
  handed the group's SwiftKV key/value states.
* :class:`SwiftKVDecoderLayerMixin`: the teacher layer, taking the SwiftKV key/value states as positional
  arguments (so reentrant gradient checkpointing sees them as inputs).
* :class:`SwiftKVModelMixin`: the decoder loop (teacher path, SwiftKV path, SwiftKV prefill).
* :class:`SwiftKVForCausalLMMixin`: turns ``logits_to_keep == 1`` with a cache into the prefill signal.
* :func:`set_swiftkv`, :func:`enable_swiftkv_prefill`, :func:`find_swiftkv_models`: work on a causal LM or on a
  VLM composite (LLaVA-NeXT, LLaVA-OneVision...) whose language model is a SwiftKV model.

SwiftKV semantics (L layers, M = ``num_key_value_layers``, G = ``key_value_group_size``):
layers ``< M`` run unchanged; ``h = norm_swiftkv(input of layer M)``; for layer ``i >= M`` of group
``g = (i - M) // G`` the keys/values are ``rope(k_proj_swiftkv(h))`` and ``v_proj_swiftkv(h)`` of the group's
first layer ``M + g * G``; the query is ``rope(q_proj_swiftkv(input_layernorm(x_i)))``; everything else of layer i
(o_proj, MLP, norms, residuals) is the teacher's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

__all__ = [
    "SwiftKVAttentionMixin",
    "SwiftKVDecoderLayerMixin",
    "SwiftKVForCausalLMMixin",
    "SwiftKVModelMixin",
    "apply_rotary_pos_emb_single",
    "enable_swiftkv_prefill",
    "find_swiftkv_models",
    "set_swiftkv",
]

# Name of the keyword argument that tells a SwiftKV base model that only the last position's output is needed.
PREFILL_KWARG = "swiftkv_last_token_only"
# Keyword arguments of packed (varlen) flash attention: the prefill shortcut does not apply to packed batches.
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate half the hidden dims (the GPT-NeoX RoPE layout that Llama and Qwen2 use)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_single(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on one tensor ``(B, heads, T, head_dim)`` with ``cos``/``sin`` of shape ``(B, T, head_dim)``.

    The teacher rotates q and k together; SwiftKV rotates them at different places (k once per group on all tokens,
    q per layer), so it needs the one-tensor form. Same arithmetic as the teacher's, so rotations match bit for bit.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


class SwiftKVAttentionMixin:
    """Adds the SwiftKV projections to a teacher attention class (put it first in the bases).

    The subclass calls :meth:`_init_swiftkv_projections` from its ``__init__`` after the teacher's init, and sets
    ``_swiftkv_eager_attention`` to the teacher module's ``eager_attention_forward``.
    """

    _swiftkv_eager_attention: Any = None

    def _init_swiftkv_projections(self, config: Any, layer_idx: int, qkv_bias: bool) -> None:
        num_kv_layers = config.num_key_value_layers
        # Layers < M keep the teacher's K/V and get no student parameters at all.
        self.is_swiftkv_layer = layer_idx >= num_kv_layers
        self.is_swiftkv_group_head = (
            self.is_swiftkv_layer and (layer_idx - num_kv_layers) % config.key_value_group_size == 0
        )
        if self.is_swiftkv_layer:
            self.q_proj_swiftkv = nn.Linear(
                config.hidden_size, config.num_attention_heads * self.head_dim, bias=qkv_bias
            )
        if self.is_swiftkv_group_head:
            self.k_proj_swiftkv = nn.Linear(
                config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias
            )
            self.v_proj_swiftkv = nn.Linear(
                config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias
            )

    def swiftkv_key_value(
        self, swiftkv_hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's K/V from ``h = norm_swiftkv(input of layer M)``: ``(B, kv_heads, T, head_dim)`` each,
        keys already rotated (this must be called on the group's first layer)."""
        hidden_shape = (*swiftkv_hidden.shape[:-1], -1, self.head_dim)
        key = self.k_proj_swiftkv(swiftkv_hidden).view(hidden_shape).transpose(1, 2)
        value = self.v_proj_swiftkv(swiftkv_hidden).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        return apply_rotary_pos_emb_single(key, cos, sin), value

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        swiftkv_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher attention when ``swiftkv_key_value`` is None; otherwise the SwiftKV student attention.

        ``swiftkv_key_value`` holds the group's (rotated) keys and values for the tokens of this call; they are
        appended to this layer's cache slot, so later tokens attend to them like to ordinary K/V.
        """
        if swiftkv_key_value is None:
            # Exactly the teacher: same module, same code path.
            return super().forward(
                hidden_states=hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                **kwargs,
            )

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj_swiftkv(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states = apply_rotary_pos_emb_single(query_states, cos, sin)

        key_states, value_states = swiftkv_key_value
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._swiftkv_eager_attention
        )
        # Qwen2 layers may use a sliding window; Llama attention has no such attribute.
        sliding = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **sliding,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class SwiftKVDecoderLayerMixin:
    """A teacher decoder layer whose attention is a :class:`SwiftKVAttentionMixin` (put it first in the bases)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        swiftkv_key: torch.Tensor | None = None,
        swiftkv_value: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The teacher layer's forward, with the SwiftKV key/value (when given) handed to its attention."""
        # The SwiftKV K/V are positional so that reentrant gradient checkpointing treats them as inputs
        # (their gradient reaches k_proj_swiftkv/v_proj_swiftkv); the teacher layer forwards **kwargs to attention.
        if swiftkv_key is not None:
            kwargs["swiftkv_key_value"] = (swiftkv_key, swiftkv_value)
        return super().forward(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )


def _slice_mask_to_last_query(mask: Any) -> tuple[bool, Any]:
    """Keep only the last query row of an attention mask. Returns ``(ok, mask)``; ``ok`` is False for mask
    kinds that cannot be sliced (e.g. flex-attention block masks), in which case the caller skips the shortcut."""
    if mask is None:
        return True, None  # sdpa/flash: a single query with no mask attends to every cached key, as it should
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 4:  # (B, 1, q, kv) for eager/sdpa
            return True, mask[:, :, -1:, :]
        if mask.dim() == 2:  # (B, kv) padding mask for flash attention: independent of the query length
            return True, mask
    return False, mask


class SwiftKVModelMixin:
    """The decoder stack of a SwiftKV model (put it first in the bases, before the teacher ``*Model``).

    The subclass builds the teacher modules (same names) plus ``norm_swiftkv`` and implements
    :meth:`_causal_mask_mapping`.
    """

    config: Any
    layers: nn.ModuleList

    def _causal_mask_mapping(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: Any,
        past_key_values: Cache | None,
        position_ids: torch.LongTensor,
    ) -> dict[str, Any]:
        """Layer type (``"full_attention"``, ``"sliding_attention"``) -> attention mask, built like the teacher."""
        raise NotImplementedError

    def _layer_type(self, layer_idx: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        return layer_types[layer_idx] if layer_types else "full_attention"

    def swiftkv(self, on: bool = True) -> SwiftKVModelMixin:
        """Switch the SwiftKV student path on or off (off = the teacher, exactly). Returns ``self``."""
        self.config.swiftkv = bool(on)
        return self

    def swiftkv_key_values(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V of every group from the input of layer M: ``[(key, value)]``, one entry per group."""
        swiftkv_hidden = self.norm_swiftkv(hidden_states)
        first, last, group = (
            self.config.num_key_value_layers,
            self.config.num_hidden_layers,
            self.config.key_value_group_size,
        )
        return [
            self.layers[head].self_attn.swiftkv_key_value(swiftkv_hidden, position_embeddings)
            for head in range(first, last, group)
        ]

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        swiftkv_last_token_only: bool = False,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        r"""The teacher's forward when ``config.swiftkv`` is False; the SwiftKV student otherwise.

        swiftkv_last_token_only (`bool`, defaults to `False`):
            The SwiftKV prefill signal: the caller needs the output of the LAST position only (generation).
            It takes effect when SwiftKV is on, a cache is passed and the call has more than one token. Then every
            token runs layers ``< M``; the cache of every layer ``>= M`` is filled from ``norm_swiftkv`` of the
            input of layer M through its group's SwiftKV K/V projections; and only the last token runs layers
            ``>= M`` (its query attends to all the cached K/V). ``last_hidden_state`` then has length 1.
            [`SwiftKVForCausalLMMixin`] sets it when ``logits_to_keep == 1`` with a cache (what ``generate()``
            passes); for a VLM composite, [`enable_swiftkv_prefill`] (called by [`set_swiftkv`]) does the same.
            Without it (training, scoring a full sequence) every token runs every layer.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            )
            position_ids = position_ids.unsqueeze(0)

        masks = self._causal_mask_mapping(inputs_embeds, attention_mask, past_key_values, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        def run_layer(
            idx: int, hidden: torch.Tensor, key_value: tuple, layer_masks: dict, pos_emb: tuple, pos_ids
        ):
            return self.layers[idx](
                hidden,
                *key_value,
                attention_mask=layer_masks[self._layer_type(idx)],
                position_embeddings=pos_emb,
                position_ids=pos_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )

        num_layers = self.config.num_hidden_layers
        num_kv_layers = self.config.num_key_value_layers if self.config.swiftkv else num_layers
        for idx in range(num_kv_layers):
            hidden_states = run_layer(idx, hidden_states, (), masks, position_embeddings, position_ids)

        if self.config.swiftkv:
            # K/V of all layers >= M for every token of this call (they go to the cache of each layer of a group).
            group_key_values = self.swiftkv_key_values(hidden_states, position_embeddings)

            if (
                swiftkv_last_token_only
                and past_key_values is not None
                and hidden_states.shape[1] > 1
                and not any(k in kwargs for k in _PACKED_KWARGS)
            ):
                sliced = {name: _slice_mask_to_last_query(mask) for name, mask in masks.items()}
                if all(ok for ok, _ in sliced.values()):
                    # The prefill saving: only the last token goes on through layers >= M.
                    masks = {name: mask for name, (_, mask) in sliced.items()}
                    hidden_states = hidden_states[:, -1:]
                    position_embeddings = tuple(t[:, -1:] for t in position_embeddings)
                    position_ids = position_ids[..., -1:]

            group_size = self.config.key_value_group_size
            for idx in range(num_kv_layers, num_layers):
                key_value = group_key_values[(idx - num_kv_layers) // group_size]
                hidden_states = run_layer(
                    idx, hidden_states, key_value, masks, position_embeddings, position_ids
                )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
        )


def _wants_last_token_only(swiftkv_on: bool, past_key_values: Any, logits_to_keep: Any, labels: Any) -> bool:
    """``generate()`` passes ``logits_to_keep=1`` and a cache on every step: that is the prefill signal."""
    return (
        bool(swiftkv_on)
        and past_key_values is not None
        and labels is None
        and isinstance(logits_to_keep, int)
        and not isinstance(logits_to_keep, bool)
        and logits_to_keep == 1
    )


class SwiftKVForCausalLMMixin:
    """Causal LM head over a SwiftKV model (put it first in the bases, before the teacher ``*ForCausalLM``)."""

    config: Any
    model: SwiftKVModelMixin

    def swiftkv(self, on: bool = True) -> SwiftKVForCausalLMMixin:
        """Switch the SwiftKV student path on or off (off = the teacher, exactly). Returns ``self``."""
        self.config.swiftkv = bool(on)
        self.model.config.swiftkv = bool(on)
        return self

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""The teacher's causal-LM forward. With SwiftKV on, ``logits_to_keep == 1``, a cache and no labels (as
        ``generate()`` calls it), the prompt takes the SwiftKV prefill shortcut (see
        [`SwiftKVModelMixin.forward`]); the returned logits then have length 1, as ``logits_to_keep=1`` asks."""
        if _wants_last_token_only(self.config.swiftkv, past_key_values, logits_to_keep, labels):
            kwargs[PREFILL_KWARG] = True
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


def find_swiftkv_models(model: nn.Module) -> list[SwiftKVModelMixin]:
    """Every SwiftKV base model (decoder stack) inside ``model``: the model itself, the ``.model`` of a causal LM,
    or the ``language_model`` of a VLM composite."""
    return [m for m in model.modules() if isinstance(m, SwiftKVModelMixin)]


def _configs_of(model: nn.Module, found: list[SwiftKVModelMixin]) -> Iterator[Any]:
    yield from (m.config for m in found)
    top = getattr(model, "config", None)
    if top is not None:
        # The composite's text_config is usually the language model's own config object, but a copy must agree too
        # (it is what save_pretrained writes).
        for cfg in (top, getattr(top, "text_config", None)):
            if cfg is not None and hasattr(cfg, "num_key_value_layers"):
                yield cfg


def _prefill_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a composite: ``logits_to_keep == 1`` with a cache -> the SwiftKV prefill signal. The
    composite forwards unknown kwargs to its language model, which ignores the flag while SwiftKV is off."""
    if _wants_last_token_only(
        True, kwargs.get("past_key_values"), kwargs.get("logits_to_keep", 0), kwargs.get("labels")
    ):
        kwargs[PREFILL_KWARG] = True
    return args, kwargs


def enable_swiftkv_prefill(model: nn.Module) -> nn.Module:
    """Make a VLM composite (any model whose forward takes ``logits_to_keep`` and passes its other kwargs to a
    SwiftKV language model) use the SwiftKV prefill shortcut under ``generate()``. Idempotent; a SwiftKV causal
    LM needs nothing (it reads ``logits_to_keep`` itself). Returns ``model``."""
    if isinstance(model, (SwiftKVForCausalLMMixin, SwiftKVModelMixin)) or getattr(
        model, "_swiftkv_prefill_hook", None
    ):
        return model
    model._swiftkv_prefill_hook = model.register_forward_pre_hook(_prefill_pre_hook, with_kwargs=True)
    return model


def set_swiftkv(model: nn.Module, on: bool) -> nn.Module:
    """Switch SwiftKV on (student) or off (teacher, exactly) in a SwiftKV causal LM, base model or VLM composite.

    Raises ``ValueError`` when ``model`` contains no SwiftKV language model. Returns ``model``.
    """
    found = find_swiftkv_models(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} contains no SwiftKV language model (LlamaSwiftKVModel / Qwen2SwiftKVModel); "
            "convert it first with swiftkv_vl.convert_to_swiftkv."
        )
    for cfg in _configs_of(model, found):
        cfg.swiftkv = bool(on)
    enable_swiftkv_prefill(model)
    return model

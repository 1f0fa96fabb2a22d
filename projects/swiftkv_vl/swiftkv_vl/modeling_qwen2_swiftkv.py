"""Qwen2 with SwiftKV (model_type ``qwen2_swiftkv``).

Same modules and parameter names as transformers' Qwen2, plus
``model.norm_swiftkv``, ``layers[i].self_attn.q_proj_swiftkv`` (i >= M) and
``layers[M + g*G].self_attn.{k,v}_proj_swiftkv`` (one pair per group). Qwen2's q/k/v carry biases, so the
SwiftKV projections do too. Sliding-window layers keep their own mask type on the SwiftKV path. With
``config.swiftkv = False`` the forward is the teacher's, op for op.

Importing this module registers the config and models with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so a ``LlavaOnevisionConfig(text_config=Qwen2SwiftKVConfig(...))`` builds and reloads.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2MLP,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    eager_attention_forward,
)

from .configuration_swiftkv import Qwen2SwiftKVConfig
from .swiftkv_common import (
    SwiftKVAttentionMixin,
    SwiftKVDecoderLayerMixin,
    SwiftKVForCausalLMMixin,
    SwiftKVModelMixin,
)

__all__ = [
    "Qwen2SwiftKVAttention",
    "Qwen2SwiftKVDecoderLayer",
    "Qwen2SwiftKVForCausalLM",
    "Qwen2SwiftKVModel",
    "register_qwen2_swiftkv",
]


class Qwen2SwiftKVAttention(SwiftKVAttentionMixin, Qwen2Attention):
    """Qwen2 attention plus the SwiftKV projections (with biases, like Qwen2's q/k/v)."""

    _swiftkv_eager_attention = staticmethod(eager_attention_forward)

    def __init__(self, config: Qwen2SwiftKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_swiftkv_projections(config, layer_idx, qkv_bias=True)


class Qwen2SwiftKVDecoderLayer(SwiftKVDecoderLayerMixin, Qwen2DecoderLayer):
    """Qwen2 decoder layer with [`Qwen2SwiftKVAttention`]."""

    def __init__(self, config: Qwen2SwiftKVConfig, layer_idx: int):
        # The teacher's submodules under the teacher's names, without building a Qwen2Attention to throw away.
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = Qwen2SwiftKVAttention(config=config, layer_idx=layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen2SwiftKVPreTrainedModel(Qwen2PreTrainedModel):
    config: Qwen2SwiftKVConfig
    config_class = Qwen2SwiftKVConfig
    _no_split_modules = ["Qwen2SwiftKVDecoderLayer"]


class Qwen2SwiftKVModel(SwiftKVModelMixin, Qwen2SwiftKVPreTrainedModel, Qwen2Model):
    """Qwen2 decoder stack with SwiftKV; see [`SwiftKVModelMixin.forward`] for the forward and the prefill rule."""

    def __init__(self, config: Qwen2SwiftKVConfig):
        Qwen2SwiftKVPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [Qwen2SwiftKVDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Normalises the input of layer M before the SwiftKV K/V projections.
        self.norm_swiftkv = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in self.config.layer_types
        self.post_init()

    def _causal_mask_mapping(
        self, inputs_embeds: Any, attention_mask: Any, past_key_values: Cache | None, position_ids: Any
    ) -> dict[str, Any]:
        # As Qwen2Model: the mapping may already have been prepared by generate().
        if isinstance(attention_mask, dict):
            return attention_mask
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "position_ids": position_ids,
        }
        mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
        if self.has_sliding_layers:
            mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return mapping


class Qwen2SwiftKVForCausalLM(SwiftKVForCausalLMMixin, Qwen2SwiftKVPreTrainedModel, Qwen2ForCausalLM):
    """Qwen2 causal LM with SwiftKV. ``swiftkv(on)`` switches the student path; ``generate()`` with SwiftKV on
    prefills through layers ``< M`` only (plus the SwiftKV K/V projections) and runs the last prompt token alone
    through layers ``>= M``."""

    def __init__(self, config: Qwen2SwiftKVConfig):
        Qwen2SwiftKVPreTrainedModel.__init__(self, config)
        self.model = Qwen2SwiftKVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def register_qwen2_swiftkv() -> None:
    """Register ``qwen2_swiftkv`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(Qwen2SwiftKVConfig.model_type, Qwen2SwiftKVConfig, exist_ok=True)
    AutoModel.register(Qwen2SwiftKVConfig, Qwen2SwiftKVModel, exist_ok=True)
    AutoModelForCausalLM.register(Qwen2SwiftKVConfig, Qwen2SwiftKVForCausalLM, exist_ok=True)


register_qwen2_swiftkv()

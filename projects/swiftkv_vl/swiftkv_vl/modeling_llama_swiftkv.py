"""Llama with SwiftKV (model_type ``llama_swiftkv``).

Same modules and parameter names as transformers' Llama, plus
``model.norm_swiftkv``, ``layers[i].self_attn.q_proj_swiftkv`` (i >= M) and
``layers[M + g*G].self_attn.{k,v}_proj_swiftkv`` (one pair per group). With ``config.swiftkv = False`` the
forward is the teacher's, op for op; the SwiftKV path and its prefill shortcut live in ``swiftkv_common``.

Importing this module registers the config and models with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so a ``LlavaNextConfig(text_config=LlamaSwiftKVConfig(...))`` builds and reloads.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
)

from .configuration_swiftkv import LlamaSwiftKVConfig
from .swiftkv_common import (
    SwiftKVAttentionMixin,
    SwiftKVDecoderLayerMixin,
    SwiftKVForCausalLMMixin,
    SwiftKVModelMixin,
)

__all__ = [
    "LlamaSwiftKVAttention",
    "LlamaSwiftKVDecoderLayer",
    "LlamaSwiftKVForCausalLM",
    "LlamaSwiftKVModel",
    "register_llama_swiftkv",
]


class LlamaSwiftKVAttention(SwiftKVAttentionMixin, LlamaAttention):
    """Llama attention plus the SwiftKV projections (no bias unless ``config.attention_bias``, like q/k/v)."""

    _swiftkv_eager_attention = staticmethod(eager_attention_forward)

    def __init__(self, config: LlamaSwiftKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self._init_swiftkv_projections(config, layer_idx, qkv_bias=config.attention_bias)


class LlamaSwiftKVDecoderLayer(SwiftKVDecoderLayerMixin, LlamaDecoderLayer):
    """Llama decoder layer with [`LlamaSwiftKVAttention`]."""

    def __init__(self, config: LlamaSwiftKVConfig, layer_idx: int):
        # nn.Module init only, then the teacher's submodules under the teacher's names: building a LlamaAttention
        # first and replacing it would initialise (and allocate) it for nothing.
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaSwiftKVAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LlamaSwiftKVPreTrainedModel(LlamaPreTrainedModel):
    config: LlamaSwiftKVConfig
    config_class = LlamaSwiftKVConfig
    _no_split_modules = ["LlamaSwiftKVDecoderLayer"]


class LlamaSwiftKVModel(SwiftKVModelMixin, LlamaSwiftKVPreTrainedModel, LlamaModel):
    """Llama decoder stack with SwiftKV; see [`SwiftKVModelMixin.forward`] for the forward and the prefill rule."""

    def __init__(self, config: LlamaSwiftKVConfig):
        LlamaSwiftKVPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LlamaSwiftKVDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Normalises the input of layer M before the SwiftKV K/V projections (initialised from
        # layers[M].input_layernorm by init_swiftkv_from_teacher).
        self.norm_swiftkv = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def _causal_mask_mapping(
        self, inputs_embeds: Any, attention_mask: Any, past_key_values: Cache | None, position_ids: Any
    ) -> dict[str, Any]:
        # Llama has one mask for all layers, built exactly as LlamaModel builds it.
        return {
            "full_attention": create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
            )
        }


class LlamaSwiftKVForCausalLM(SwiftKVForCausalLMMixin, LlamaSwiftKVPreTrainedModel, LlamaForCausalLM):
    """Llama causal LM with SwiftKV. ``swiftkv(on)`` switches the student path; ``generate()`` with SwiftKV on
    prefills through layers ``< M`` only (plus the SwiftKV K/V projections) and runs the last prompt token alone
    through layers ``>= M``."""

    def __init__(self, config: LlamaSwiftKVConfig):
        LlamaSwiftKVPreTrainedModel.__init__(self, config)
        self.model = LlamaSwiftKVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def register_llama_swiftkv() -> None:
    """Register ``llama_swiftkv`` with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(LlamaSwiftKVConfig.model_type, LlamaSwiftKVConfig, exist_ok=True)
    AutoModel.register(LlamaSwiftKVConfig, LlamaSwiftKVModel, exist_ok=True)
    AutoModelForCausalLM.register(LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM, exist_ok=True)


register_llama_swiftkv()

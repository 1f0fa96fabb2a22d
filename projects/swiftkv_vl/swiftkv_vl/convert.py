"""Teacher -> SwiftKV student: config conversion, weight loading, initialisation and freezing.

Typical use (the model factory of the trainer)::

    student = convert_to_swiftkv(teacher_model, num_key_value_layers=2, key_value_group_size=1)
    trainable = freeze_all_but_swiftkv(student)       # only norm_swiftkv / *_proj_swiftkv train

``convert_to_swiftkv`` works on a plain Llama/Qwen2 config or model and on a VLM composite (LLaVA-NeXT,
LLaVA-OneVision, ...) whose ``text_config`` is Llama/Qwen2.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .configuration_swiftkv import LlamaSwiftKVConfig, Qwen2SwiftKVConfig
from .modeling_llama_swiftkv import LlamaSwiftKVForCausalLM, LlamaSwiftKVModel
from .modeling_qwen2_swiftkv import Qwen2SwiftKVForCausalLM, Qwen2SwiftKVModel
from .swiftkv_common import find_swiftkv_models

__all__ = [
    "convert_to_swiftkv",
    "freeze_all_but_swiftkv",
    "init_swiftkv_from_teacher",
    "is_swiftkv_parameter",
    "to_swiftkv_config",
]

# teacher model_type -> SwiftKV config class (a SwiftKV type maps to itself, to change M or G)
_SWIFTKV_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaSwiftKVConfig,
    "llama_swiftkv": LlamaSwiftKVConfig,
    "qwen2": Qwen2SwiftKVConfig,
    "qwen2_swiftkv": Qwen2SwiftKVConfig,
}
# SwiftKV config class -> (base model class, causal LM class)
_SWIFTKV_MODELS: dict[type[PretrainedConfig], tuple[type[PreTrainedModel], type[PreTrainedModel]]] = {
    LlamaSwiftKVConfig: (LlamaSwiftKVModel, LlamaSwiftKVForCausalLM),
    Qwen2SwiftKVConfig: (Qwen2SwiftKVModel, Qwen2SwiftKVForCausalLM),
}


def is_swiftkv_parameter(name: str) -> bool:
    """True for the student parameters (``norm_swiftkv.*``, ``*_proj_swiftkv.*``) in a state-dict name."""
    return any(part.endswith("_swiftkv") for part in name.split("."))


def _text_to_swiftkv(
    config: PretrainedConfig, num_key_value_layers: int, key_value_group_size: int
) -> PretrainedConfig:
    config_class = _SWIFTKV_CONFIGS.get(config.model_type)
    if config_class is None:
        raise ValueError(
            f"Cannot convert a '{config.model_type}' language model to SwiftKV; supported: {sorted(_SWIFTKV_CONFIGS)}."
        )
    values = config.to_dict()
    values.pop("model_type", None)  # the class decides the model_type
    values.update(num_key_value_layers=num_key_value_layers, key_value_group_size=key_value_group_size)
    values.setdefault("swiftkv", False)
    if values.get("architectures"):
        base_class, lm_class = _SWIFTKV_MODELS[config_class]
        values["architectures"] = [
            lm_class.__name__ if name.endswith("ForCausalLM") else base_class.__name__
            for name in values["architectures"]
        ]
    new_config = config_class.from_dict(values)
    # The attention backend is runtime state, not part of to_dict(); keep the teacher's.
    new_config._attn_implementation = config._attn_implementation
    return new_config


def to_swiftkv_config(
    config: PretrainedConfig, num_key_value_layers: int, key_value_group_size: int = 1
) -> PretrainedConfig:
    """The SwiftKV version of a Llama/Qwen2 text config, or of a VLM composite config whose ``text_config`` is one.

    The ``model_type`` of the text config changes (``llama`` -> ``llama_swiftkv``, ``qwen2`` -> ``qwen2_swiftkv``);
    every other field is kept. Raises ``ValueError`` for other model types or an invalid (M, G) layout.
    """
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        return _text_to_swiftkv(config, num_key_value_layers, key_value_group_size)
    new_config = copy.deepcopy(config)
    new_config.text_config = _text_to_swiftkv(text_config, num_key_value_layers, key_value_group_size)
    return new_config


def convert_to_swiftkv(
    teacher_config_or_model: PretrainedConfig | PreTrainedModel,
    num_key_value_layers: int,
    key_value_group_size: int = 1,
) -> PretrainedConfig | PreTrainedModel:
    """Convert a teacher to SwiftKV.

    * A config gives the SwiftKV config (see :func:`to_swiftkv_config`).
    * A model (``LlamaForCausalLM``/``Qwen2ForCausalLM``, their base models, or a VLM composite over one) gives a
      new SwiftKV model of the matching class (a composite keeps its own class), same dtype and attention backend,
      holding the teacher's weights under the same names; the SwiftKV parameters (the only missing ones) are then
      set by :func:`init_swiftkv_from_teacher`. SwiftKV is off: the result computes exactly what the teacher does.
    """
    if isinstance(teacher_config_or_model, PretrainedConfig):
        return to_swiftkv_config(teacher_config_or_model, num_key_value_layers, key_value_group_size)
    teacher = teacher_config_or_model
    new_config = to_swiftkv_config(teacher.config, num_key_value_layers, key_value_group_size)

    if getattr(new_config, "text_config", None) is None:
        base_class, lm_class = _SWIFTKV_MODELS[type(new_config)]
        model_class = lm_class if hasattr(teacher, "lm_head") else base_class
    else:
        model_class = type(teacher)
    student = model_class._from_config(new_config, dtype=teacher.dtype)
    student.to(teacher.device)

    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    bad_missing = [name for name in missing if not is_swiftkv_parameter(name)]
    if unexpected or bad_missing:
        raise RuntimeError(
            f"Teacher weights do not fit the SwiftKV model: unexpected={unexpected}, missing={bad_missing}"
        )
    init_swiftkv_from_teacher(student)
    student.train(teacher.training)
    return student


@torch.no_grad()
def init_swiftkv_from_teacher(model: nn.Module) -> nn.Module:
    """Initialise every SwiftKV parameter of ``model`` (a causal LM, base model or composite) from the teacher's:

    * ``norm_swiftkv`` <- ``layers[M].input_layernorm`` (the norm that layer M applies to the same input);
    * ``q_proj_swiftkv`` of layer i <- layer i's ``q_proj`` (weight and bias);
    * ``k_proj_swiftkv``/``v_proj_swiftkv`` of each group <- the mean of ``k_proj``/``v_proj`` over the group's G
      layers (weights and, for Qwen2, biases).

    Returns ``model``.
    """
    found = find_swiftkv_models(model)
    if not found:
        raise ValueError(f"{type(model).__name__} contains no SwiftKV language model.")
    for lm in found:
        first, last, group = (
            lm.config.num_key_value_layers,
            lm.config.num_hidden_layers,
            lm.config.key_value_group_size,
        )
        lm.norm_swiftkv.weight.copy_(lm.layers[first].input_layernorm.weight)
        for idx in range(first, last):
            attn = lm.layers[idx].self_attn
            _copy_linear(attn.q_proj_swiftkv, [attn.q_proj])
        for head in range(first, last, group):
            members = [lm.layers[idx].self_attn for idx in range(head, head + group)]
            _copy_linear(lm.layers[head].self_attn.k_proj_swiftkv, [a.k_proj for a in members])
            _copy_linear(lm.layers[head].self_attn.v_proj_swiftkv, [a.v_proj for a in members])
    return model


def _copy_linear(target: nn.Linear, sources: list[nn.Linear]) -> None:
    """``target`` <- mean of ``sources`` (weight, and bias when the target has one), averaged in fp32."""
    target.weight.copy_(torch.stack([s.weight.float() for s in sources]).mean(0))
    if target.bias is not None:
        target.bias.copy_(torch.stack([s.bias.float() for s in sources]).mean(0))


def freeze_all_but_swiftkv(model: nn.Module) -> list[str]:
    """Freeze every parameter except the SwiftKV ones (``norm_swiftkv``, ``*_proj_swiftkv``).

    Returns the names of the trainable parameters. Raises ``ValueError`` if there are none.
    """
    trainable: list[str] = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_swiftkv_parameter(name))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no SwiftKV parameters to train.")
    return trainable

"""swiftkv_vl: SwiftKV distillation for vision-language models (Llama and Qwen2 language models).

Importing the package registers the SwiftKV configs and models with transformers' Auto classes
(:func:`register_auto`, about 1.5 s of torch/transformers imports), so after ``import swiftkv_vl`` a saved
LLaVA-NeXT / LLaVA-OneVision composite with a SwiftKV ``text_config`` (e.g. a distillation run's ``final/``)
reloads with ``from_pretrained`` like any transformers model. The public names below are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "LlamaSwiftKVConfig": "configuration_swiftkv",
    "Qwen2SwiftKVConfig": "configuration_swiftkv",
    "check_swiftkv_layout": "configuration_swiftkv",
    "LlamaSwiftKVModel": "modeling_llama_swiftkv",
    "LlamaSwiftKVForCausalLM": "modeling_llama_swiftkv",
    "Qwen2SwiftKVModel": "modeling_qwen2_swiftkv",
    "Qwen2SwiftKVForCausalLM": "modeling_qwen2_swiftkv",
    "set_swiftkv": "swiftkv_common",
    "enable_swiftkv_prefill": "swiftkv_common",
    "find_swiftkv_models": "swiftkv_common",
    "init_swiftkv_from_teacher": "convert",
    "freeze_all_but_swiftkv": "convert",
    "convert_to_swiftkv": "convert",
    "to_swiftkv_config": "convert",
    "is_swiftkv_parameter": "convert",
    "swiftkv_distill_loss_sums": "loss",
}

__all__ = [
    "LlamaSwiftKVConfig",
    "LlamaSwiftKVForCausalLM",
    "LlamaSwiftKVModel",
    "Qwen2SwiftKVConfig",
    "Qwen2SwiftKVForCausalLM",
    "Qwen2SwiftKVModel",
    "check_swiftkv_layout",
    "convert_to_swiftkv",
    "enable_swiftkv_prefill",
    "find_swiftkv_models",
    "freeze_all_but_swiftkv",
    "init_swiftkv_from_teacher",
    "is_swiftkv_parameter",
    "register_auto",
    "set_swiftkv",
    "swiftkv_distill_loss_sums",
    "to_swiftkv_config",
]
assert set(__all__) == {*_LAZY, "register_auto"}

if TYPE_CHECKING:  # pragma: no cover
    from .configuration_swiftkv import LlamaSwiftKVConfig, Qwen2SwiftKVConfig, check_swiftkv_layout
    from .convert import (
        convert_to_swiftkv,
        freeze_all_but_swiftkv,
        init_swiftkv_from_teacher,
        is_swiftkv_parameter,
        to_swiftkv_config,
    )
    from .loss import swiftkv_distill_loss_sums
    from .modeling_llama_swiftkv import LlamaSwiftKVForCausalLM, LlamaSwiftKVModel
    from .modeling_qwen2_swiftkv import Qwen2SwiftKVForCausalLM, Qwen2SwiftKVModel
    from .swiftkv_common import enable_swiftkv_prefill, find_swiftkv_models, set_swiftkv


def register_auto() -> None:
    """Register ``llama_swiftkv`` and ``qwen2_swiftkv`` with AutoConfig, AutoModel and AutoModelForCausalLM.

    Idempotent (``exist_ok``); safe to call from every process and plugin hook.
    """
    from .modeling_llama_swiftkv import register_llama_swiftkv
    from .modeling_qwen2_swiftkv import register_qwen2_swiftkv

    register_llama_swiftkv()
    register_qwen2_swiftkv()


# Eager on purpose: transformers has no lazy hook for third-party model types, and a saved SwiftKV composite
# (or arctic_vl loading one through this plugin) must reload without an extra call.
register_auto()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'swiftkv_vl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

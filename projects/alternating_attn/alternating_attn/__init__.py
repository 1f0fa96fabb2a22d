"""Alternating attention for LLaVA-OneVision / Qwen2 (arctic_vl project `alternating_attn`).

Import-light: importing the package loads neither torch nor transformers (nor arctic_vl). It does make the model
types known to transformers' Auto classes: at once if transformers is already imported, else right after the first
`import transformers` (a one-shot import hook), so `import alternating_attn` is all a user needs before
`AutoModelForImageTextToText.from_pretrained(run / "final")`. The public names are resolved lazily from their
modules on first access:

* configs: `Qwen2AlternatingConfig`, `LlavaQwenAlternatingConfig`, `LlavaQwenAlternatingCrossConfig`,
  `alternating_layer_indices` (configuration_alternating);
* models: `AlternatingQwen2Model`, `AlternatingQwen2ForCausalLM`, `LlavaQwenAlternating[Cross]Model`,
  `LlavaQwenAlternating[Cross]ForConditionalGeneration`, `composite_model_class`, `register_auto`
  (modeling_alternating; importing it registers the Auto classes);
* variants: `VARIANT_MODEL_TYPES`, `check_variant`, `read_model_type`, `build_composite_config` (variants);
* weights: `init_from_backbone`, `load_backbone_state_dict`, `WeightReport` (backbone).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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


def _register_with_transformers() -> None:
    """Register the configs and models with transformers' Auto classes (imports torch and transformers)."""
    try:
        importlib.import_module(f"{__name__}.modeling_alternating")  # registers on import
    except Exception as e:  # never break the caller's `import transformers` over our registration
        warnings.warn(f"alternating_attn: could not register with transformers' Auto classes: {e}", stacklevel=2)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Runs `_register_with_transformers` right after the first `import transformers` completes.

    `import alternating_attn` must make saved composites loadable with `AutoModelForImageTextToText` /
    `from_pretrained`, but must not import transformers itself: every `arctic_vl` command loads this plugin, and
    `arctic_vl validate` must stay instant. So registration waits for transformers to be imported by whoever
    needs it. The finder removes itself on first use.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real spec, from the finders after us
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register_with_transformers()

        loader.exec_module = exec_then_register  # this spec's own loader instance
        return spec


def _install_registration_hook() -> None:
    if "transformers" in sys.modules:
        _register_with_transformers()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())


_install_registration_hook()


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

"""Load a local VLM checkpoint (model, processor) and tell which family it belongs to.

Only local directories; never `trust_remote_code`. Plugins that add their own composite model types
register them with transformers' Auto classes and with `families.register_model_type`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from arctic_vl.errors import ConfigError
from arctic_vl.models.attention import use_varlen_attention
from arctic_vl.models.families import FamilySpec, family_for_model_type, unsupported_model_type


def _config_path(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model directory {str(root)!r} does not exist")
    config = root / "config.json"
    if not config.is_file():
        raise ConfigError(f"model directory {str(root)!r} has no config.json (not a saved HF model)")
    return config


def family_of_dir(path: str | Path) -> FamilySpec:
    """The family of the checkpoint in `path`, from its config.json alone (no weights read)."""
    config_file = _config_path(path)
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {str(config_file)!r}: {exc}") from exc
    spec = family_for_model_type(model_type or "")
    if spec is None:
        raise ConfigError(unsupported_model_type(model_type, str(config_file)))
    return spec


def default_attn_implementation() -> str:
    """`flash_attention_2` when flash_attn imports and CUDA is there, else `sdpa`."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def load_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
):
    """Load the VLM in `path` with its family's class (Auto class for plugin model types).

    With sdpa (the default) the language model runs `arctic_varlen` attention: sdpa for ordinary batches,
    attention per sample for packed ones (see `arctic_vl.models.attention`); the vision tower keeps sdpa.
    """
    import transformers
    from transformers import AutoModelForImageTextToText

    spec = family_of_dir(path)
    attn = attn_implementation or "sdpa"
    if attn == "flash_attention_2" and default_attn_implementation() != "flash_attention_2":
        raise ConfigError("attn_implementation 'flash_attention_2' needs flash_attn and a GPU; use 'sdpa' or 'eager'")
    model_type = json.loads(_config_path(path).read_text())["model_type"]
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn, "trust_remote_code": False}
    if model_type == spec.model_type:
        model = getattr(transformers, spec.model_class).from_pretrained(path, **kwargs)
    else:  # a plugin's composite type: it registered its class with the Auto mapping
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if attn == "sdpa":  # packed batches then attend per sample, without a dense block mask (models/attention.py)
        use_varlen_attention(model)
    return model


def model_skeleton(path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """The model of `path` built from its config.json on the meta device: the modules, shapes and config of
    `load_model`'s, no weights read and no memory held (what a data build reads of a model, for inspect-data)."""
    import transformers
    from transformers import AutoConfig

    family_of_dir(path)  # an unsupported model type is refused as load_model refuses it
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation or "sdpa", trust_remote_code=False)


def load_processor(path: str | Path):
    """Load the processor saved in `path` (image-only variants where HF's needs torchvision)."""
    from transformers import AutoProcessor

    from arctic_vl.models.processors import PROCESSOR_CLASSES

    spec = family_of_dir(path)
    processor_file = Path(path) / "processor_config.json"
    saved_class = None
    if processor_file.is_file():
        saved_class = json.loads(processor_file.read_text()).get("processor_class")
    if saved_class == PROCESSOR_CLASSES[spec.name].__name__ or importlib.util.find_spec("torchvision"):
        return AutoProcessor.from_pretrained(path, trust_remote_code=False)
    # A real checkpoint names HF's processor, whose video part needs torchvision: load ours instead.
    return PROCESSOR_CLASSES[spec.name].from_pretrained(path)

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
    from arctic_vl.models.model_dir import read_json_file

    config = read_json_file(config_file.parent, config_file.name)
    model_type = config.get("model_type") if isinstance(config, dict) else None
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

    The directory is checked first (`arctic_vl.models.model_dir.check_model_dir`: config, safetensors headers
    and sizes, index shards inside the directory, tokenizer and processor JSON); weights that do not fit the
    config (a missing, unexpected or differently shaped tensor: the config lies about the weights) and any
    error of `from_pretrained` are a ConfigError (exit 2) naming the directory, the file and the tensor.
    With sdpa (the default) the language model runs `arctic_varlen` attention: sdpa for ordinary batches,
    attention per sample for packed ones (see `arctic_vl.models.attention`); the vision tower keeps sdpa.
    """
    import transformers
    from transformers import AutoModelForImageTextToText

    from arctic_vl.models.model_dir import check_model_dir

    spec = family_of_dir(path)
    attn = attn_implementation or "sdpa"
    if attn == "flash_attention_2" and default_attn_implementation() != "flash_attention_2":
        raise ConfigError("attn_implementation 'flash_attention_2' needs flash_attn and a GPU; use 'sdpa' or 'eager'")
    located = check_model_dir(path)
    model_type = json.loads(_config_path(path).read_text())["model_type"]
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn, "trust_remote_code": False,
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    cls = getattr(transformers, spec.model_class) if model_type == spec.model_type else AutoModelForImageTextToText
    try:  # (a plugin's composite type registered its class with the Auto mapping)
        model, info = cls.from_pretrained(path, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # a library error about this directory: name it, no traceback
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ConfigError(f"model directory {path}: cannot be loaded: {type(e).__name__}: "
                          f"{lines[-1] if lines else e}") from None
    _check_loading_info(Path(path), info, located)
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


def _check_loading_info(root: Path, info: dict[str, Any], located: dict[str, str]) -> None:
    """Refuse weights that do not fit the config: transformers would initialise the tensors randomly."""
    def where(key: str) -> str:
        for name in (key, *(key.split(".", n)[-1] for n in range(1, 3))):  # names as saved may lack a prefix
            if name in located:
                return located[name]
        return next(iter(sorted(set(located.values()))), "the weights")

    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        key, saved, wanted = (*tuple(mismatched[0]), None, None)[:3]
        shapes = f": {list(saved)} in the file, {list(wanted)} by config.json" if saved is not None else ""
        raise ConfigError(f"model directory {root}: {where(key)}: tensor {key!r} does not fit the model config.json "
                          f"describes{shapes} ({len(mismatched)} such tensors); config.json does not match the "
                          "weights (a wrong hidden size, layer count or model_type?)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        files = ", ".join(sorted(set(located.values()))) or "the weights"
        raise ConfigError(f"model directory {root}: {files}: no tensor {missing[0]!r}, which the model config.json "
                          f"describes needs ({len(missing)} missing); config.json does not match the weights "
                          "(a wrong model_type or layer count?), or a shard is incomplete")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise ConfigError(f"model directory {root}: {where(unexpected[0])}: tensor {unexpected[0]!r} has no place in "
                          f"the model config.json describes ({len(unexpected)} such tensors); config.json does not "
                          "match the weights (a wrong model_type or layer count?)")
    errors = info.get("error_msgs") or []
    if errors:
        raise ConfigError(f"model directory {root}: the weights do not load: {str(errors[0]).splitlines()[0]}")


def load_processor(path: str | Path):
    """Load the processor saved in `path` (image-only variants where HF's needs torchvision)."""
    from transformers import AutoProcessor

    from arctic_vl.models.model_dir import JSON_FILES, read_json_file
    from arctic_vl.models.processors import PROCESSOR_CLASSES

    spec = family_of_dir(path)
    root = Path(path)
    for name in JSON_FILES:  # a broken tokenizer.json / processor_config.json: named, not a tokenizers traceback
        if (root / name).is_file():
            read_json_file(root, name)
    saved_class = None
    if (root / "processor_config.json").is_file():
        saved = read_json_file(root, "processor_config.json")
        saved_class = saved.get("processor_class") if isinstance(saved, dict) else None
    try:
        if saved_class == PROCESSOR_CLASSES[spec.name].__name__ or importlib.util.find_spec("torchvision"):
            return AutoProcessor.from_pretrained(path, trust_remote_code=False)
        # A real checkpoint names HF's processor, whose video part needs torchvision: load ours instead.
        return PROCESSOR_CLASSES[spec.name].from_pretrained(path)
    except ConfigError:
        raise
    except Exception as e:  # tokenizers / transformers errors about these files: name the directory
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ConfigError(f"model directory {path}: its tokenizer or processor cannot be loaded: "
                          f"{type(e).__name__}: {lines[-1] if lines else e}") from None

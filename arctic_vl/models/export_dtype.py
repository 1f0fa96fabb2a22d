"""The dtype an export is written in: the source checkpoint's by default, not the fp32 of training.

Training keeps fp32 master weights (`model.dtype: float32`) even for a bf16 checkpoint; writing `final/` in
fp32 would double its size against the original. `model.export_dtype: auto` takes the dtype the source
checkpoint's weights are STORED in: read from the safetensors headers of every shard of the model directory
(no tensor is loaded), the floating dtype of the majority of parameters when they are mixed; only without
safetensors files, the dtype its config.json names. A config's `dtype` may disagree with its tensors (a float32
checkpoint whose `text_config.dtype` says bfloat16), so it is never trusted over them. A state dict is cast on
its way to disk, never the live model (a run can export and go on training), and every dtype field of the
exported config.json (top level and every sub-config) is stamped with the dtype written.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: the dtype names a config may give, as config.json writes them
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: safetensors' dtype codes of the floating dtypes an export can be written in
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
#: keys under which a config.json names a dtype
DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclass
class StoredDtype:
    """The dtype of a checkpoint's weights as stored: `name` (float32 | bfloat16 | float16), `params` per
    dtype code as the files hold them (floating and not), and where it was read from (`source`)."""

    name: str
    source: str
    params: dict[str, int] = field(default_factory=dict)

    @property
    def mixed(self) -> bool:
        """Whether the floating parameters are stored in more than one dtype."""
        return sum(1 for code in self.params if code.startswith(("F", "BF"))) > 1

    def describe(self) -> str:
        """`bfloat16 (safetensors headers of 2 files: BF16 1200000, F32 3000 parameters)`."""
        counts = ", ".join(f"{code} {n}" for code, n in sorted(self.params.items(), key=lambda kv: -kv[1]))
        return f"{self.name} ({self.source}" + (f": {counts} parameters" if counts else "") + ")"


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor name -> {dtype, shape, data_offsets}); reads no tensor."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: every shard of its index, else its top-level *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
        except (OSError, json.JSONDecodeError, KeyError, AttributeError):
            pass
    return sorted(model_dir.glob("*.safetensors"))


def _config_dtype(model_dir: Path) -> str | None:
    """The dtype config.json names (top level, then its text config), if any."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for value in [cfg.get(k) for k in DTYPE_KEYS] + [text.get(k) for k in DTYPE_KEYS]:
        if isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES:
            return value.removeprefix("torch.")
    return None


def stored_dtype(model_dir: str | Path) -> StoredDtype | None:
    """The dtype `model_dir`'s weights are stored in (see the module docstring); None when nothing tells."""
    model_dir = Path(model_dir)
    files = _weight_files(model_dir)
    params: Counter[str] = Counter()
    try:
        for path in files:
            for name, info in safetensors_header(path).items():
                if name != "__metadata__" and isinstance(info, dict):
                    n = 1
                    for d in info.get("shape", []):
                        n *= int(d)
                    params[str(info.get("dtype"))] += n
    except (OSError, ValueError, struct.error):  # unreadable weights: the load that follows names the file
        params.clear()
    floating = {code: n for code, n in params.items() if code in SAFETENSORS_DTYPES}
    if floating:
        # the majority by parameters; a tie goes to the wider dtype (F32 before BF16 before F16: no precision lost)
        order = list(SAFETENSORS_DTYPES)
        code = max(floating, key=lambda c: (floating[c], -order.index(c)))
        where = f"safetensors headers of {len(files)} file{'s' if len(files) != 1 else ''}"
        return StoredDtype(SAFETENSORS_DTYPES[code], where, dict(params))
    named = _config_dtype(model_dir)
    return StoredDtype(named, "config.json (no safetensors weights to read)") if named else None


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The name of the dtype `model_dir`'s weights are stored in (`stored_dtype`), if known."""
    stored = stored_dtype(model_dir)
    return stored.name if stored is not None else None


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to `dtype` (others as they are); tensors that shared storage still do (tied weights)."""
    done: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key not in done:
            done[key] = tensor.detach().to(dtype)
        out[name] = done[key]
    return out


def _stamp(cfg: dict[str, Any], dtype_name: str) -> None:
    """Every dtype field of `cfg` and of each config nested in it (text_config, vision_config, ...) set to
    `dtype_name`."""
    for key in DTYPE_KEYS:
        if key in cfg:
            cfg[key] = dtype_name
    for key, value in cfg.items():
        if isinstance(value, dict) and (key.endswith("_config") or any(k in value for k in DTYPE_KEYS)):
            _stamp(value, dtype_name)


def stamp_config_dtype(out_dir: Path, dtype_name: str) -> None:
    """Write `dtype_name` into every dtype field of `out_dir/config.json`: the top level (`dtype`; save_pretrained
    names the live model's dtype there) and each sub-config's, so none disagrees with the tensors written."""
    path = Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype_name
    _stamp(cfg, dtype_name)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

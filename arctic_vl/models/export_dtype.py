"""The dtype an export is written in: the source checkpoint's by default, not the fp32 of training.

Training keeps fp32 master weights (`model.dtype: float32`) even for a bf16 checkpoint; writing `final/` in
fp32 would double its size against the original. `model.export_dtype: auto` takes the dtype the source
checkpoint's config.json names (`dtype`, or the older `torch_dtype`); a state dict is cast on its way to
disk, never the live model (a run can export and go on training).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: the dtype names a config may give, as config.json writes them
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model_dir: str | Path) -> str | None:
    """The dtype named by `model_dir/config.json` (`dtype` or `torch_dtype`, top level or text config), if any."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for value in (cfg.get("dtype"), cfg.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype")):
        if isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES:
            return value.removeprefix("torch.")
    return None


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


def stamp_config_dtype(out_dir: Path, dtype_name: str) -> None:
    """Write `dtype_name` into `out_dir/config.json` (save_pretrained names the live model's dtype there)."""
    path = Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["dtype"] = dtype_name
    cfg.pop("torch_dtype", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

"""bbu_detection: a DETR-style detection head trained jointly with a Qwen-VL model (an arctic_vl plugin).

Public names, loaded on first access: `DetectionHead`, `DetectionHeadConfig`, `load_detection_head`,
`save_detection_head`, `DetectionVLM`, `load_detection_model` (a run's export: the HF VLM and its head),
`predict`, `make_detection_data`, `hungarian_match`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "DetectionHead": "head",
    "DetectionHeadConfig": "head",
    "load_detection_head": "head",
    "save_detection_head": "head",
    "DetectionVLM": "factory",
    "load_detection_model": "factory",
    "predict": "predict",
    "make_detection_data": "synthetic",
    "hungarian_match": "matcher",
}

__all__ = [
    "DetectionHead",
    "DetectionHeadConfig",
    "DetectionVLM",
    "hungarian_match",
    "load_detection_head",
    "load_detection_model",
    "make_detection_data",
    "predict",
    "save_detection_head",
]
assert set(__all__) == set(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .factory import DetectionVLM, load_detection_model
    from .head import DetectionHead, DetectionHeadConfig, load_detection_head, save_detection_head
    from .matcher import hungarian_match
    from .predict import predict
    from .synthetic import make_detection_data


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bbu_detection' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

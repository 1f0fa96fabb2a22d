"""arctic_vl: a training engine for vision-language models.

The public API is imported lazily so `arctic_vl --help` does not pay for torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Engine": "arctic_vl.engine",
    "EngineConfig": "arctic_vl.config.schema",
    "ComponentConfig": "arctic_vl.registry",
    "Component": "arctic_vl.registry",
    "MODELS": "arctic_vl.registry",
    "DATA": "arctic_vl.registry",
    "TRAINERS": "arctic_vl.registry",
    "OPTIMIZERS": "arctic_vl.registry",
    "SCHEDULERS": "arctic_vl.registry",
    "CHECKPOINTERS": "arctic_vl.registry",
    "CALLBACKS": "arctic_vl.registry",
    "DISTRIBUTED": "arctic_vl.registry",
    "ConfigError": "arctic_vl.errors",
    "DataError": "arctic_vl.errors",
    "UserError": "arctic_vl.errors",
}

__all__ = [  # noqa: RUF022  (grouped as in _LAZY)
    "Engine",
    "EngineConfig",
    "ComponentConfig",
    "Component",
    "MODELS",
    "DATA",
    "TRAINERS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "CHECKPOINTERS",
    "CALLBACKS",
    "DISTRIBUTED",
    "ConfigError",
    "DataError",
    "UserError",
]

if TYPE_CHECKING:  # pragma: no cover
    from arctic_vl.config.schema import EngineConfig
    from arctic_vl.engine import Engine
    from arctic_vl.errors import ConfigError, DataError, UserError
    from arctic_vl.registry import (
        CALLBACKS,
        CHECKPOINTERS,
        DATA,
        DISTRIBUTED,
        MODELS,
        OPTIMIZERS,
        SCHEDULERS,
        TRAINERS,
        Component,
        ComponentConfig,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'arctic_vl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

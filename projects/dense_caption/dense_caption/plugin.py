"""The arctic_vl plugin (entry point `dense_caption` in group `arctic_vl.plugins`).

Registers the `dense_caption` data factory, the `dense_caption` (SFT) and `gkd` trainers, the
`arctic_vl dense-caption stage-a|stage-b` verbs, and a config check: the project's trainers evaluate
dense-caption answers, so they need the `dense_caption` data factory.
"""

from __future__ import annotations

from typing import Any

from arctic_vl import ConfigError, register_cli_verb, register_config_check

from .data import DenseCaptionDataConfig, DenseCaptionDataFactory
from .gkd import GKDTrainer, GKDTrainerConfig
from .trainer import DenseCaptionTrainer, DenseEvalConfig

__all__ = ["DenseCaptionDataFactory", "DenseCaptionTrainer", "GKDTrainer", "check_config", "register"]


def check_config(cfg: Any, located: Any) -> None:
    """The project's trainers read dense-caption items (ground truth, telemetry): data.type must be dense_caption."""
    if isinstance(cfg.trainer, DenseEvalConfig | GKDTrainerConfig) and not isinstance(cfg.data, DenseCaptionDataConfig):
        raise ConfigError(
            f"invalid config: {located.where(('data', 'type'))}: data.type: trainer.type {cfg.trainer.type!r} "
            f"evaluates dense-caption answers and needs data.type 'dense_caption' (got {cfg.data.type!r})")


def _verb(argv: list[str]) -> int:
    from .inference import main

    return main(argv)


def register() -> None:
    """Called by arctic_vl's plugin loader after import (the registrations above happen at import)."""
    register_cli_verb("dense-caption", _verb, help="dense_caption tools: stage-a (per-image summaries), "
                      "stage-b (group verdicts)")
    register_config_check(check_config)

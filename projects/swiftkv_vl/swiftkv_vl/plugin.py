"""The arctic_vl plugin (entry point `swiftkv_vl` in group `arctic_vl.plugins`).

Registers the `swiftkv_vl` model factory, data factory and trainer, the `swiftkv-eval` CLI verb, and a config check that
ties the trainer's `hidden_loss_layer` to the model's layout. The core never imports this package: it finds
this module through the entry point.
"""

from __future__ import annotations

from typing import Any

from arctic_vl import ConfigError, register_cli_verb, register_config_check

from .data import SwiftKVDataFactory
from .factory import SwiftKVModelConfig, SwiftKVModelFactory
from .trainer import SwiftKVTrainer, SwiftKVTrainerConfig

__all__ = ["SwiftKVDataFactory", "SwiftKVModelFactory", "SwiftKVTrainer", "check_config", "register"]


def check_config(cfg: Any, located: Any) -> None:
    """The `swiftkv_vl` trainer needs the `swiftkv_vl` model, and its MSE layer must come after layer M."""
    trainer, model = cfg.trainer, cfg.model
    if not isinstance(trainer, SwiftKVTrainerConfig):
        return
    if not isinstance(model, SwiftKVModelConfig):
        raise ConfigError(
            f"invalid config: {located.where(('trainer', 'type'))}: trainer.type: 'swiftkv_vl' distils a SwiftKV "
            f"student into its own teacher and needs model.type 'swiftkv_vl' (got {model.type!r}, "
            f"{located.where(('model', 'type'))})"
        )
    if getattr(cfg.data, "packing", False):
        raise ConfigError(
            f"invalid config: {located.where(('data', 'packing'))}: data.packing: the swiftkv_vl trainer weights "
            "each sample by whether it holds an image (vision_loss_weight / text_loss_weight) and packed rows mix "
            "samples; set packing: false"
        )
    if trainer.hidden_loss_mult == 0:
        return
    _, _, layers = model.layout
    m = model.num_key_value_layers
    index = trainer.hidden_loss_layer
    resolved = index + layers + 1 if index < 0 else index  # hidden_states has L + 1 entries
    if not m + 1 <= resolved <= layers:
        raise ConfigError(
            f"invalid config: {located.where(('trainer', 'hidden_loss_layer'))}: trainer.hidden_loss_layer: {index} "
            f"selects hidden state {resolved} of 0..{layers}; the MSE needs a layer after num_key_value_layers "
            f"({m}): allowed {m + 1}..{layers} or {-(layers - m)}..-1 (earlier hidden states are the frozen "
            "teacher's, so the term would be 0); or set hidden_loss_mult: 0"
        )


def _eval_verb(argv: list[str]) -> int:
    from .evaluation import main

    return main(argv)


def register() -> None:
    """Called by arctic_vl's plugin loader after import (registration itself happens at import)."""
    register_cli_verb("swiftkv-eval", _eval_verb,
                      help="student vs teacher on data.eval_sources: top-1 agreement and exact-match accuracies")
    register_config_check(check_config)

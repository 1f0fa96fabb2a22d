"""`trainer.compile`: torch.compile the language model's decoder layers, each in place (regional compilation).

The decoder layers are where a VLM step spends its FLOPs, and they are all the same code: compiled once, the
graph is shared by every layer (parameters are graph inputs), and padded or packed batches of any length reuse it
with dynamic shapes. Compiling the whole step instead meets data-dependent code (placing image features, gathering
label positions, the per-sample attention of packed rows) that breaks the graph and recompiles; here that code
runs eagerly between compiled layers. In place (`Module.compile`) keeps every parameter name, so checkpoints and
exports are those of the eager model and a run may switch compile on or off when it resumes.
"""

from __future__ import annotations

import torch

from arctic_vl.errors import ConfigError
from arctic_vl.models.attention import language_model_of


def compile_decoder_layers(model: torch.nn.Module, *, dynamic: bool | None = True, mode: str | None = None) -> int:
    """Compile each decoder layer of `model`'s language model in place; returns how many."""
    lm = language_model_of(model)
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"trainer.compile: {type(model).__name__} has no language model with decoder `layers` "
                          "to compile; set trainer.compile: false")
    for layer in layers:
        layer.compile(dynamic=dynamic, mode=mode)
    return len(layers)

"""ModelFactory: builds the model (and its processor) a run trains, and exports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arctic_vl.registry import Component, ComponentConfig


@dataclass
class ModelBundle:
    """What a model factory hands the trainer."""

    model: torch.nn.Module
    processor: Any
    family: Any = None  # arctic_vl.models.families.FamilySpec, or None for a plain language model
    extras: dict[str, Any] = field(default_factory=dict)

    def part_of(self, name: str) -> str | None:
        """`vision` | `aligner` | `llm` for a parameter name (PEFT prefixes stripped), or None."""
        if self.family is None:
            return "llm"
        from arctic_vl.models.families import part_of

        return part_of(self.family, strip_peft_prefix(name))


def strip_peft_prefix(name: str) -> str:
    """`base_model.model.x.lora_A.default.weight` -> `x.lora_A.default.weight`; `x.base_layer.weight` -> `x.weight`."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    name = name.replace(".base_layer.", ".")
    name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    return name


class ModelFactory(Component):
    """Subclasses set `config_class` and implement `build`; `describe` must stay pure (config files only)."""

    config_class = ComponentConfig

    def __init__(self, config: ComponentConfig, engine_config: Any = None):
        self.config = config
        self.engine_config = engine_config

    def describe(self) -> str:
        """A one-line description for `arctic_vl validate` (e.g. the model type), reading no weights."""
        return self.registered_name

    def build(self, device: torch.device | None = None) -> ModelBundle:
        raise NotImplementedError

    def export(self, bundle: ModelBundle, model: torch.nn.Module, out_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write an HF directory (`save_pretrained`, safetensors) with the processor."""
        raise NotImplementedError

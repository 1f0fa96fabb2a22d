"""ModelFactory: builds the model (and its processor) a run trains, and exports it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from arctic_vl.constants import PARTS
from arctic_vl.registry import MODELS, Component, ComponentConfig


@dataclass
class ModelBundle:
    """What a model factory hands the trainer and the data factory.

    `model`: the torch module to train (a PEFT wrapper under LoRA). `processor`: the HF processor (its
    `tokenizer`, image processor and chat template drive the encoding). `family`: the `FamilySpec` of the
    six VLM families the model belongs to (None for a plain language model). `extras`: whatever the
    factory wants to hand its trainer (e.g. a detection head, a teacher). `part_names` lists every part
    `part_of` may return (the three VLM parts, plus a factory's own, e.g. `detection`).
    """

    model: torch.nn.Module
    processor: Any
    family: Any = None  # arctic_vl.models.families.FamilySpec, or None for a plain language model
    extras: dict[str, Any] = field(default_factory=dict)
    part_names: tuple[str, ...] = PARTS

    def part_of(self, name: str) -> str | None:
        """`vision` | `aligner` | `llm` for a parameter name (PEFT prefixes stripped), or None."""
        if self.family is None:
            return "llm"
        from arctic_vl.models.families import part_of

        return part_of(self.family, strip_peft_prefix(name))

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Parameters of the model by part: {"total": {"params": N, "trainable": T}, "vision": {...}, ...,
        "other": {...}} with every name of `part_names` present and `other` for parameters of no part (a
        tied weight counts once; LoRA adapters count in the part they adapt; a PEFT modules_to_save module counts
        once, as its trained copy)."""
        from arctic_vl.models.lora import is_peft_copy

        counts = {name: {"params": 0, "trainable": 0} for name in ("total", *self.part_names, "other")}
        for name, param in self.model.named_parameters():
            if is_peft_copy(name):
                continue
            n = int(getattr(param, "ds_numel", param.numel()))  # a ZeRO-3 partitioned parameter keeps its size there
            part = self.part_of(name)
            for key in ("total", part if part in counts else "other"):
                counts[key]["params"] += n
                counts[key]["trainable"] += n if param.requires_grad else 0
        return counts


def strip_peft_prefix(name: str) -> str:
    """`base_model.model.x.lora_A.default.weight` -> `x.lora_A.default.weight`; `x.base_layer.weight` -> `x.weight`."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    name = name.replace(".base_layer.", ".")
    name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    return name


class ModelFactory(Component, ABC):
    """Builds the model of a run from its `model:` section; registered in `MODELS`.

    The engine calls, in this order: `prepare` (main process only, before any rank builds: write files the
    build needs), `build` (every rank), and at the end `export`. `describe` (for `arctic_vl validate`) and
    `load_processor` must read config files only, never weights; `build_for_data` (for `arctic_vl inspect-data`)
    should read as little as the data factory needs.
    `parts` names the parameter groups the model's parameters fall into (`ModelBundle.part_of`); the
    optimizer's `param_groups[].parts` may name any of them.
    """

    config_class = ComponentConfig
    parts: ClassVar[tuple[str, ...]] = PARTS

    def __init__(self, config: ComponentConfig, engine_config: Any = None):
        self.config = config
        self.engine_config = engine_config

    def describe(self) -> str:
        """A one-line description for `arctic_vl validate` (e.g. the model type), reading no weights."""
        return self.registered_name

    def prepare(self, output_dir: Path, seed: int) -> None:
        """On the main process, before any rank builds (e.g. write an inline tiny model). Default: nothing."""

    def source_dirs(self, output_dir: Path) -> dict[str, Path]:
        """The local model directories the build reads, by the config key that names them (e.g.
        `model.name_or_path`): each checkpoint records their fingerprint and a resume whose directory changed
        is refused (frozen weights are not in checkpoints). Default: none."""
        return {}

    @abstractmethod
    def build(self, device: torch.device | None = None, output_dir: Path | None = None,
              path: Path | None = None) -> ModelBundle:
        """The model to train on `device`; `path` (evaluation of a finished run) loads that export instead."""

    @abstractmethod
    def export(self, bundle: ModelBundle, model: torch.nn.Module, out_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the trained model to `out_dir` (an HF directory: `save_pretrained`, safetensors, processor).

        `state_dict`: the full weights when the backend gathered them (ZeRO-3); else read `model` itself.
        """

    def build_for_data(self, output_dir: Path) -> ModelBundle:
        """The bundle a data factory's `build` is handed, as cheaply as this factory can make it, on no process
        group (`arctic_vl inspect-data` builds the run's data exactly as training does with it).

        Default: the full `build` on the CPU. `HFModelFactory` builds the model from its config on the meta
        device instead (no weights read): a data factory reads the processor, the family, the model's config
        and `extras`, never weights.
        """
        return self.build(device=torch.device("cpu"), output_dir=output_dir)

    def load_processor(self, output_dir: Path) -> tuple[Any, Any]:
        """(processor, family) without loading weights (a tool that needs only the tokenizer and the family)."""
        from arctic_vl.errors import ConfigError

        raise ConfigError(f"model.type {self.registered_name!r}: this model factory cannot load a processor alone; "
                          "this tool needs one")


MODELS.bind_base(ModelFactory)

"""DataFactory: turns the config's sources into datasets, a collator and (optionally) a batcher for the loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from arctic_vl.registry import Component, ComponentConfig


@dataclass
class DataBundle:
    """What a data factory hands the trainer. `report` counts every record that was skipped, by reason."""

    train: torch.utils.data.Dataset
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    eval: torch.utils.data.Dataset | None = None
    report: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    #: optional: groups train indices into micro-batches (packing); default is fixed-size micro-batches
    batcher: Any = None


class DataFactory(Component):
    """Subclasses set `config_class` and implement `build`."""

    config_class = ComponentConfig

    def __init__(self, config: ComponentConfig, engine_config: Any = None):
        self.config = config
        self.engine_config = engine_config

    def build(self, model_bundle: Any, *, seed: int) -> DataBundle:
        raise NotImplementedError

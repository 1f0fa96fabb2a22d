"""DataFactory: turns the config's sources into datasets, a collator and a sampler for the loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from arctic_vl.constants import epoch_seed
from arctic_vl.registry import DATA, Component, ComponentConfig


@dataclass
class DataBundle:
    """What a data factory hands the trainer.

    `train` / `eval`: map-style datasets whose items the `collate` function turns into a batch following
    `arctic_vl.Batch` (index -1 asks for a padding sample that trains nothing). `report` counts every record
    that was skipped, by reason (a `BadRecordReport`). `stats` go to run_info.json. `batcher(epoch,
    world_size)`, when set, plans every rank's micro-batches of an epoch itself (packing); otherwise the loop
    deals fixed `micro_batch_size` micro-batches in a seeded (`shuffle`) or file order. `num_workers`:
    DataLoader workers. `fingerprint`: per training source, what identifies its content (record counts, a
    cheap hash): saved with checkpoints, a resume with different data is refused.
    """

    train: torch.utils.data.Dataset
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    eval: torch.utils.data.Dataset | None = None
    report: Any = None
    stats: dict[str, Any] = field(default_factory=dict)
    #: optional: groups train indices into micro-batches (packing); default is fixed-size micro-batches
    batcher: Any = None
    micro_batch_size: int = 1
    shuffle: bool = True
    num_workers: int = 0
    fingerprint: dict[str, Any] = field(default_factory=dict)


class DataFactory(Component, ABC):
    """Builds a run's data from its `data:` section; registered in `DATA`.

    `build(model_bundle, seed=...)` is called on every rank after the model is built (the processor and
    family of `model_bundle` drive the encoding) and returns a DataBundle.
    """

    config_class = ComponentConfig

    def __init__(self, config: ComponentConfig, engine_config: Any = None):
        self.config = config
        self.engine_config = engine_config

    @abstractmethod
    def build(self, model_bundle: Any, *, seed: int) -> DataBundle:
        """The datasets, collator and batching settings of the run."""


DATA.bind_base(DataFactory)


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's micro-batches of one epoch, in a seeded order, starting at micro-batch `start`.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have
    seen: resume starts at a position, it never iterates over skipped batches. Every rank gets the
    same number of micro-batches; where the epoch's last global batch is short, a rank may get an
    index of -1, a padding sample that carries no labels (so it changes no loss or gradient).
    """

    def __init__(self, batches: list[list[int]], world_size: int, rank: int, start: int = 0):
        self.batches = batches
        self.world_size, self.rank, self.start = world_size, rank, start

    @staticmethod
    def plan(n: int, micro_batch_size: int, world_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[list[int]]]:
        """All ranks' micro-batches for an epoch: plan[b][r] is rank r's b-th micro-batch."""
        if shuffle:
            g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_global = micro_batch_size * world_size
        plan = []
        for s in range(0, n, per_global):
            chunk = order[s:s + per_global]
            if len(chunk) == per_global:
                plan.append([chunk[r * micro_batch_size:(r + 1) * micro_batch_size] for r in range(world_size)])
            else:  # short last batch: spread evenly, pad empty ranks
                parts = [chunk[r::world_size] for r in range(world_size)]
                plan.append([p if p else [-1] for p in parts])
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, len(self.batches)):
            yield self.batches[b][self.rank]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

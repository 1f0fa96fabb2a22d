"""DataFactory: turns the config's sources into datasets, a collator and (optionally) a batcher for the loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from loguru import logger

from arctic_vl.batch import DROPPED
from arctic_vl.data.sampling import EpochBatchSampler
from arctic_vl.errors import DataError
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
    cheap hash): saved with checkpoints, a resume with different data is refused. `on_bad_record`: the policy for
    samples a batch lost when they were loaded (`accept`).
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
    on_bad_record: str = "error"
    #: the message of a bad sample found under on_bad_record "error", until the loop raises it (`raise_pending`)
    pending_error: str | None = None

    def plan(self, epoch: int, world_size: int, seed: int) -> list[list[list[Any]]]:
        """Every rank's micro-batches of `epoch`: plan[b][r] is rank r's b-th micro-batch, a list of `train`
        indices (deterministic in seed and epoch): the `batcher`'s, else fixed `micro_batch_size` micro-batches
        in a seeded (`shuffle`) or file order. The training loop and `inspect-data` both read it here."""
        if self.batcher is not None:
            return self.batcher(epoch, world_size)
        return EpochBatchSampler.plan(len(self.train), self.micro_batch_size, world_size, seed, epoch, self.shuffle)

    def accept(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Apply `on_bad_record` to the samples `batch` lost when they were loaded (its `_dropped` entries, e.g.
        pixels that did not decode in a DataLoader worker); returns the batch without that key.

        `skip`: each such record is counted once in `report` (however many epochs drop it) and logged the first
        time. `error`: the first one is kept as `pending_error`; the loop raises it on every process at once
        (`raise_pending`) so no process is left waiting in a collective.
        """
        dropped = batch.pop(DROPPED, None)
        for source, index, reason, message in dropped or ():
            if self.on_bad_record == "error":
                self.pending_error = self.pending_error or message
            elif self.report is not None and self.report.add_late(source, index, reason, message):
                logger.warning(f"skipping {message}")
        return batch

    def raise_pending(self, processes_with_errors: float = 1) -> None:
        """Raise the DataError of a bad sample found under `error` (here or, when `processes_with_errors` says
        so, on another process)."""
        if self.pending_error is not None:
            raise DataError(self.pending_error + " (on_bad_record='skip' drops such records and counts them)")
        if processes_with_errors:
            raise DataError("another process found a bad record under on_bad_record='error'; its message above "
                            "names the file, the record and the reason")


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

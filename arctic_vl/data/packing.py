"""Padding-free packing: several samples share one row of up to `data.max_length` tokens.

`PackingPlanner` is a `DataBundle.batcher`: for (seed, epoch) it orders the samples with a seeded
permutation, packs them best-fit decreasing into rows (never splitting a sample, so never an image),
shuffles the rows, and deals `micro_batch_size` rows per micro-batch to each rank. The plan depends
only on (lengths, max_length, seed, epoch), so a resumed run gets exactly the batches it would have
seen. Best-fit decreasing packs the sorted lengths, so the number of rows (and of steps) is the same
every epoch; the epoch's seeded order decides which of equally long samples share a row and, above
all, the order of the rows, i.e. which samples meet in a step. (Samples in one row never interact:
they are isolated in attention.) Plan entries are `(row, sample)` keys: `VLMDataset` tags each item with its row, and
`PackedCollator` concatenates each row's samples (`SampleEncoder.collate_packed`), which gives every
sample its own positions (per-sample mRoPE for the Qwen families) and isolates samples in attention.

Efficiency is real tokens / slots, slots = rows x max_length: how much of the token budget the rows
fill. The planner reports it for a plan (logged, put into the data stats and run_info.json) and the
collator adds `_num_slots` to each batch, so the loop logs it per step.
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from arctic_vl.constants import epoch_seed
from arctic_vl.errors import DataError

#: a plan key: (row within the micro-batch, sample index); sample -1 is a padding sample (no labels)
PackKey = tuple[int, int]
PADDING_KEY: PackKey = (0, -1)


def best_fit_decreasing(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack the samples in `order` into rows of at most `capacity` tokens, best-fit decreasing.

    Samples are taken longest first (a stable sort, so equal lengths keep their place in `order`:
    that is where the seeded shuffle shows) and each goes into the open row with the least room
    that still fits it (ties: the oldest row), or opens a new row. Best-fit decreasing uses at most
    11/9 OPT + 1 rows. O(n log n + n * rows) with a sorted free list; the per-insert cost is a
    memmove, about a second for a million samples.
    """
    too_long = [i for i in order if lengths[i] > capacity]
    if too_long:
        raise DataError(f"{len(too_long)} samples are longer than the packing capacity {capacity} "
                        f"(first: sample {too_long[0]} with {lengths[too_long[0]]} tokens)", reason="too_long")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row id), sorted: the best fit is the first room >= length
    for i in sorted(order, key=lambda k: -lengths[k]):
        length = lengths[i]
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
        else:
            row, room = len(rows), capacity
            rows.append([i])
        room -= length
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


class PackingPlanner:
    """`DataBundle.batcher` for packing: `planner(epoch, world_size)` is every rank's micro-batches.

    plan[b][r] is rank r's b-th micro-batch: a list of `(row, sample)` keys, `micro_batch_size` rows
    of whole samples, each row at most `max_length` tokens. Where the epoch's last global batch is
    short, rows are spread over the ranks and a rank left without one gets a padding sample (no
    labels), as in `EpochBatchSampler.plan`.
    """

    def __init__(self, lengths: Sequence[int], max_length: int, micro_batch_size: int, seed: int,
                 shuffle: bool = True):
        if max_length < 1 or micro_batch_size < 1:
            raise ValueError(f"max_length and micro_batch_size must be >= 1, got {max_length}, {micro_batch_size}")
        self.lengths = list(lengths)
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, list[list[int]]] = {}  # the loop asks for an epoch's plan more than once

    def _generator(self, epoch: int) -> torch.Generator:
        # Same seeding rule as EpochBatchSampler.plan: the order depends on (seed, epoch) only.
        return torch.Generator().manual_seed(epoch_seed(self.seed, epoch))

    def rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of `epoch` (sample indices), in the order they are trained."""
        if epoch not in self._cache:
            n = len(self.lengths)
            if self.shuffle:
                g = self._generator(epoch)
                order = torch.randperm(n, generator=g).tolist()
                rows = best_fit_decreasing(self.lengths, order, self.max_length)
                # Rows come out longest-first; a shuffle keeps long and short steps mixed over the epoch.
                rows = [rows[k] for k in torch.randperm(len(rows), generator=g).tolist()]
            else:
                rows = best_fit_decreasing(self.lengths, range(n), self.max_length)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = rows
        return self._cache[epoch]

    def __call__(self, epoch: int, world_size: int) -> list[list[list[PackKey]]]:
        rows, mbs = self.rows(epoch), self.micro_batch_size

        def keys(part: list[list[int]]) -> list[PackKey]:
            return [(r, i) for r, row in enumerate(part) for i in row] or [PADDING_KEY]

        per_global = mbs * world_size
        plan = []
        for s in range(0, len(rows), per_global):
            chunk = rows[s:s + per_global]
            if len(chunk) == per_global:
                plan.append([keys(chunk[r * mbs:(r + 1) * mbs]) for r in range(world_size)])
            else:  # short last batch: spread evenly, pad empty ranks
                plan.append([keys(chunk[r::world_size]) for r in range(world_size)])
        return plan

    def stats(self, epoch: int = 0) -> dict[str, Any]:
        """Rows, tokens and efficiencies of `epoch`'s plan, next to what padding would give.

        `efficiency`: real tokens / (rows x max_length). `unpacked_padding_efficiency`: real tokens /
        padded slots of the same samples in unpacked micro-batches of `micro_batch_size`, each padded
        to its longest sample (the epoch's seeded order, as `EpochBatchSampler.plan` draws it).
        """
        rows = self.rows(epoch)
        tokens = sum(self.lengths)
        n = len(self.lengths)
        if self.shuffle:
            order = torch.randperm(n, generator=self._generator(epoch)).tolist()
        else:
            order = list(range(n))
        padded = sum(len(chunk) * max(self.lengths[i] for i in chunk)
                     for chunk in (order[s:s + self.micro_batch_size] for s in range(0, n, self.micro_batch_size)))
        slots = len(rows) * self.max_length
        return {
            "samples": n, "rows": len(rows), "tokens": tokens, "max_length": self.max_length,
            "samples_per_row": n / max(len(rows), 1),
            "efficiency": tokens / max(slots, 1),
            "unpacked_micro_batches": -(-n // self.micro_batch_size),
            "unpacked_padding_efficiency": tokens / max(padded, 1),
        }


class RopeIndex:
    """A model's own `get_rope_index` on one sample: (ids (1, L), types (1, L), grid_thw) -> (3, 1, L).

    Holds the backbone's bound method; it reads only the config (no parameters), so it runs in
    DataLoader workers (forked) on CPU tensors while the model itself lives on the accelerator.
    """

    def __init__(self, model: torch.nn.Module):
        from arctic_vl.models.forward import unwrap_peft

        hf = unwrap_peft(model)
        backbone = getattr(hf, "model", hf)
        fn = getattr(backbone, "get_rope_index", None)
        if fn is None:
            raise TypeError(f"{type(backbone).__name__} has no get_rope_index; it is not a Qwen-VL model")
        self._fn = fn
        # Older transformers (the GPU image has 5.17) may take no mm_token_type_ids.
        self._takes_types = "mm_token_type_ids" in inspect.signature(fn).parameters

    def __call__(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                 image_grid_thw: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"image_grid_thw": image_grid_thw}
        if self._takes_types:
            kwargs["mm_token_type_ids"] = mm_token_type_ids
        with torch.no_grad():
            positions, _ = self._fn(input_ids, **kwargs)
        return positions


class PackedCollator:
    """Collates a packed micro-batch (items tagged `_row` by the dataset) with `collate_packed`.

    Items without `_row` (evaluation batches, built sample by sample) go to `fallback`, the
    ordinary padding collator. Adds the loop's bookkeeping: `_indices`, `_num_samples`,
    `_num_tokens` (real tokens), `_num_slots` (rows x max_length, for the per-step efficiency).

    `single_row`: put all rows of the micro-batch into ONE row, with no padding at all. Needed for
    flash attention: transformers runs it variable-length (samples isolated) only for a batch of one
    row; with more rows it would attend across the samples of a row. Its cost is per sample anyway.
    """

    def __init__(self, encoder: Any, max_length: int, fallback: Any, rope_index: RopeIndex | None = None,
                 single_row: bool = False):
        self.encoder = encoder
        self.max_length = max_length
        self.fallback = fallback
        self.rope_index = rope_index
        self.single_row = single_row

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if not any("_row" in s for s in samples):
            return self.fallback(samples)
        rows: dict[int, list[dict[str, Any]]] = {}
        indices = []
        for s in samples:
            indices.append(s.pop("_index"))
            rows.setdefault(s.pop("_row", 0), []).append(s)
        grouped = [rows[r] for r in sorted(rows)]
        n_rows = len(grouped)
        if self.single_row:
            grouped = [[s for row in grouped for s in row]]
        batch: dict[str, Any] = self.encoder.collate_packed(grouped, self.rope_index)
        real = [i != -1 for i in indices]
        batch["_indices"] = indices
        batch["_num_samples"] = sum(real)
        batch["_num_tokens"] = int(sum(len(s["input_ids"]) for s, r in zip(samples, real) if r))
        batch["_num_slots"] = n_rows * self.max_length
        return batch

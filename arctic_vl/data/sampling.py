"""Sampling: which samples each rank trains on, in which micro-batch, in every epoch.

One plan routine serves both batchers. `epoch_order` draws the epoch's order from `epoch_seed(seed,
epoch)` only, so a resumed run, every rank and every worker agree; `deal` cuts a sequence of units
(samples, or packed rows) into global batches and gives each rank its micro-batch, with the one rule for
the epoch's short last batch: units spread round-robin over the ranks, and a rank left with none gets a
padding unit (sample index -1: it carries no labels, so it changes no loss or gradient). Resume starts at
a micro-batch position; it never iterates over skipped batches.

- `EpochBatchSampler.plan`: fixed-size micro-batches of samples (the default); `BalancedBatcher` the same with
  each global batch's samples shared out token-balanced over the ranks (`balance`).
- `PackingPlanner`, a `DataBundle.batcher`: padding-free packing. For (seed, epoch) it orders the samples,
  packs them best-fit decreasing into rows of up to `max_length` tokens (never splitting a sample, so
  never an image), shuffles the rows and deals `micro_batch_size` rows per micro-batch to each rank. Best-
  fit decreasing packs the sorted lengths, so the number of rows (and of steps) is the same every epoch;
  the epoch's order decides which of equally long samples share a row and, above all, the order of the
  rows, i.e. which samples meet in a step. Plan entries are `(row, sample)` keys: the dataset tags each
  item with its row and `arctic_vl.data.collate.PackedCollator` packs each row.

Packing efficiency is real tokens / slots, slots = rows x max_length: how much of the token budget the
rows fill. The planner reports it for a plan (logged, in the data stats and run_info.json); the packed
collator adds `_num_slots` to each batch, so the loop logs it per step.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from arctic_vl.constants import epoch_seed
from arctic_vl.errors import DataError

U = TypeVar("U")

#: the sample index of a padding sample (no labels): what a rank gets when the epoch's last batch runs out
PADDING_INDEX = -1
#: a packing plan key: (row within the micro-batch, sample index)
PackKey = tuple[int, int]
PADDING_KEY: PackKey = (0, PADDING_INDEX)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of everything random in one epoch's order (seeded by `epoch_seed(seed, epoch)`)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, generator: torch.Generator | None = None) -> list[int]:
    """The epoch's order of `n` items: a permutation drawn from `generator` (default: a fresh
    `epoch_generator(seed, epoch)`), or 0..n-1 when not shuffling."""
    if not shuffle:
        return list(range(n))
    g = generator if generator is not None else epoch_generator(seed, epoch)
    return torch.randperm(n, generator=g).tolist()


def balance(chunk: Sequence[U], capacities: Sequence[int], cost: Callable[[U], float]) -> list[list[U]]:
    """`chunk` split into one part per rank of `capacities[r]` units each, with about equal total cost.

    Longest-processing-time first: units by decreasing cost (ties: their place in `chunk`) each go to the
    rank with the least cost so far among those with room (ties: the lowest rank). A part keeps its units in
    `chunk` order. Deterministic: a function of `chunk` and the costs only.
    """
    parts: list[list[int]] = [[] for _ in capacities]
    loads = [0.0] * len(capacities)
    for k in sorted(range(len(chunk)), key=lambda k: -cost(chunk[k])):
        r = min((r for r in range(len(capacities)) if len(parts[r]) < capacities[r]), key=lambda r: (loads[r], r))
        parts[r].append(k)
        loads[r] += cost(chunk[k])
    return [[chunk[k] for k in sorted(part)] for part in parts]


def deal(units: Sequence[U], per_rank: int, world_size: int, padding: U,
         cost: Callable[[U], float] | None = None) -> list[list[list[U]]]:
    """Every rank's micro-batches: plan[b][r] is rank r's units of global batch b, in `units` order.

    A full global batch gives each rank `per_rank` units: the r-th run of consecutive units, or with `cost`
    (a unit's tokens) a `balance`d share, so every rank gets about the same number of tokens and none waits
    for another at the step's gradient all-reduce. The short last batch gives ranks at most one unit more
    than another (round-robin, or balanced likewise) and a rank left with none gets `[padding]`, so every
    rank runs the same number of micro-batches. Either way the global batch holds the same units: the loss,
    normalised by the global token count, is the same.
    """
    per_global = per_rank * world_size
    plan = []
    for s in range(0, len(units), per_global):
        chunk = list(units[s:s + per_global])
        full = len(chunk) == per_global
        if cost is not None and world_size > 1:
            capacities = [per_rank if full else len(chunk[r::world_size]) for r in range(world_size)]
            plan.append([part or [padding] for part in balance(chunk, capacities, cost)])
        elif full:
            plan.append([chunk[r * per_rank:(r + 1) * per_rank] for r in range(world_size)])
        else:
            plan.append([chunk[r::world_size] or [padding] for r in range(world_size)])
    return plan


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's micro-batches of one epoch, in a seeded order, starting at micro-batch `start`.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have
    seen. Every rank gets the same number of micro-batches; where the epoch's last global batch is short,
    a rank may get the index -1, a padding sample that carries no labels.
    """

    def __init__(self, batches: list[list[Any]], world_size: int, rank: int, start: int = 0):
        self.batches = batches
        self.world_size, self.rank, self.start = world_size, rank, start

    @staticmethod
    def plan(n: int, micro_batch_size: int, world_size: int, seed: int, epoch: int, shuffle: bool,
             lengths: Sequence[int] | None = None) -> list[list[list[int]]]:
        """All ranks' micro-batches of `n` samples for an epoch: plan[b][r] is rank r's b-th micro-batch;
        with `lengths` (tokens per sample) each global batch is shared out token-balanced (`deal`)."""
        cost = None if lengths is None else lengths.__getitem__
        return deal(epoch_order(n, seed, epoch, shuffle), micro_batch_size, world_size, PADDING_INDEX, cost)


    def __iter__(self) -> Iterator[list[Any]]:
        for b in range(self.start, len(self.batches)):
            yield self.batches[b][self.rank]

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)


class BalancedBatcher:
    """`DataBundle.batcher` without packing: `EpochBatchSampler.plan` with every global batch's samples shared
    out so each rank gets about the same number of tokens (the same samples per global batch as the plain
    plan: one process trains exactly what it would)."""

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, seed: int, shuffle: bool = True):
        self.lengths = list(lengths)
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self._cache: dict[tuple[int, int], list[list[list[int]]]] = {}  # the loop asks for a plan more than once

    def __call__(self, epoch: int, world_size: int) -> list[list[list[int]]]:
        """plan[b][r]: rank r's b-th micro-batch of sample indices for `epoch` (cached for the last four epochs)."""
        key = (epoch, world_size)
        if key not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = EpochBatchSampler.plan(len(self.lengths), self.micro_batch_size, world_size, self.seed,
                                                      epoch, self.shuffle, self.lengths)
        return self._cache[key]

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
    of whole samples, each row at most `max_length` tokens, dealt by `deal` like the plain sampler's
    (a rank left without a row gets a padding sample).
    """

    def __init__(self, lengths: Sequence[int], max_length: int, micro_batch_size: int, seed: int,
                 shuffle: bool = True, balance_ranks: bool = True):
        if max_length < 1 or micro_batch_size < 1:
            raise ValueError(f"max_length and micro_batch_size must be >= 1, got {max_length}, {micro_batch_size}")
        self.lengths = list(lengths)
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.balance_ranks = balance_ranks
        self._cache: dict[int, list[list[int]]] = {}  # the loop asks for an epoch's plan more than once

    def rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of `epoch` (sample indices), in the order they are trained."""
        if epoch not in self._cache:
            n = len(self.lengths)
            g = epoch_generator(self.seed, epoch)
            rows = best_fit_decreasing(self.lengths, epoch_order(n, self.seed, epoch, self.shuffle, g),
                                       self.max_length)
            # Rows come out longest-first; a shuffle keeps long and short steps mixed over the epoch.
            rows = [rows[k] for k in epoch_order(len(rows), self.seed, epoch, self.shuffle, g)]
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = rows
        return self._cache[epoch]

    def __call__(self, epoch: int, world_size: int) -> list[list[list[PackKey]]]:
        """plan[b][r]: rank r's b-th micro-batch of `(row, sample)` keys for `epoch`, rows dealt by `deal`."""
        def keys(part: list[list[int]]) -> list[PackKey]:
            return [(r, i) for r, row in enumerate(part) for i in row]

        def tokens(row: list[int]) -> float:
            return float(sum(self.lengths[i] for i in row if i != PADDING_INDEX))

        plan = deal(self.rows(epoch), self.micro_batch_size, world_size, [PADDING_INDEX],
                    tokens if self.balance_ranks else None)
        return [[keys(part) for part in step] for step in plan]

    def stats(self, epoch: int = 0) -> dict[str, Any]:
        """Rows, tokens and efficiencies of `epoch`'s plan, next to what padding would give.

        `efficiency`: real tokens / (rows x max_length). `unpacked_padding_efficiency`: real tokens /
        padded slots of the same samples in unpacked micro-batches of `micro_batch_size`, each padded
        to its longest sample (the epoch's order, as `EpochBatchSampler.plan` draws it).
        """
        rows = self.rows(epoch)
        tokens = sum(self.lengths)
        n = len(self.lengths)
        order = epoch_order(n, self.seed, epoch, self.shuffle)
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

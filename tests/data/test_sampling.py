"""Length-balanced ranks: each global batch holds the same samples as the plain plan, shared out by tokens."""

from __future__ import annotations

import random

import pytest

from arctic_vl.data.sampling import (
    PADDING_INDEX,
    BalancedBatcher,
    EpochBatchSampler,
    PackingPlanner,
    epoch_order,
)


def _tokens(part: list[int], lengths: list[int]) -> int:
    return sum(lengths[i] for i in part if i != PADDING_INDEX)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_balanced_plan_keeps_global_batches_and_evens_tokens(world_size):
    rng = random.Random(world_size)
    lengths = [rng.choice([rng.randint(20, 60), rng.randint(300, 500)]) for _ in range(203)]  # a skewed mix
    for epoch in (0, 1):
        plain = EpochBatchSampler.plan(len(lengths), 4, world_size, 11, epoch, True)
        balanced = BalancedBatcher(lengths, 4, 11, shuffle=True)(epoch, world_size)
        assert balanced == BalancedBatcher(lengths, 4, 11, shuffle=True)(epoch, world_size)  # deterministic
        position = {i: k for k, i in enumerate(epoch_order(len(lengths), 11, epoch, True))}
        if world_size == 1:
            assert balanced == plain  # one process trains exactly what it did
            continue
        assert len(balanced) == len(plain)
        worst_plain = worst_balanced = 0
        for a, b in zip(plain, balanced):
            assert sorted(i for part in a for i in part) == sorted(i for part in b for i in part)
            assert [len(p) for p in a] == [len(p) for p in b]  # every rank as many samples as before
            for part in b:
                assert part == sorted(part, key=position.__getitem__)  # the epoch's order within a rank
            spread_a = max(_tokens(p, lengths) for p in a) - min(_tokens(p, lengths) for p in a)
            spread_b = max(_tokens(p, lengths) for p in b) - min(_tokens(p, lengths) for p in b)
            worst_plain, worst_balanced = max(worst_plain, spread_a), max(worst_balanced, spread_b)
            assert max(_tokens(p, lengths) for p in b) <= max(_tokens(p, lengths) for p in a) + max(lengths)
        assert worst_balanced < worst_plain / 2, (worst_balanced, worst_plain)


def test_packing_plan_balances_rows_over_ranks():
    rng = random.Random(0)
    lengths = [rng.randint(10, 250) for _ in range(400)]
    balanced = PackingPlanner(lengths, 256, 2, seed=3)(0, 2)
    plain = PackingPlanner(lengths, 256, 2, seed=3, balance_ranks=False)(0, 2)
    for a, b in zip(plain, balanced):
        assert sorted(k[1] for part in a for k in part) == sorted(k[1] for part in b for k in part)
    spread = [max(sum(lengths[i] for _, i in p if i >= 0) for p in step) -
              min(sum(lengths[i] for _, i in p if i >= 0) for p in step) for step in balanced]
    plain_spread = [max(sum(lengths[i] for _, i in p if i >= 0) for p in step) -
                    min(sum(lengths[i] for _, i in p if i >= 0) for p in step) for step in plain]
    assert sum(spread) < sum(plain_spread)

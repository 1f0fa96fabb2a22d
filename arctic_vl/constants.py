"""Facts every layer shares, each defined once: the ignore index, the part names, the per-epoch seed rule.

This module imports nothing of the project (and nothing heavy), so any layer may use it.
"""

from __future__ import annotations

#: the label of a position that is not trained (PyTorch's cross-entropy default `ignore_index`)
IGNORE_INDEX: int = -100

#: the three parts of every VLM, named the same in configs, freezing, LoRA targets and LR groups
PARTS: tuple[str, ...] = ("vision", "aligner", "llm")

#: multiplier of the per-epoch seed rule (a prime, so (seed, epoch) pairs do not collide for small epochs)
_EPOCH_SEED_STRIDE = 100_003


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in one epoch's data order (shuffle, packing, augmentation draws).

    A function of (seed, epoch) only, so a resumed run, every rank and every DataLoader worker agree.
    """
    return int(seed) * _EPOCH_SEED_STRIDE + int(epoch)

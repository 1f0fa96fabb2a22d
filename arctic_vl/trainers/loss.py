"""The language-model loss, computed at label positions only and in chunks.

Full-vocabulary fp32 logits for every position of every sequence are the largest tensor of a VLM step
(150k vocab x 8k tokens x 4 bytes = 4.9 GB). We gather the hidden states of the positions that have a
label, project them through the output layer a chunk at a time, and recompute each chunk's logits in
backward instead of keeping them: peak memory holds one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from arctic_vl.constants import IGNORE_INDEX

#: below this many logits (positions x vocab) a step keeps its logits: recomputing costs more than it saves
LEAN_THRESHOLD = 1 << 24


def _ce_chunk(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    # Call the head module (not F.linear on head.weight): ZeRO-3 gathers a module's weights in its forward
    # hooks, and a LoRA-wrapped head adds its delta there.
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions t whose next token labels[t+1] is trained, and those targets (the causal shift)."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def lm_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 2048
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over label tokens, and their count.

    Returning a sum (not a mean) lets the loop divide by the label tokens of the whole accumulated
    batch across processes: the mean over tokens, not a mean of per-micro-batch means.
    """
    mask, targets = label_positions(labels)
    h = hidden[:, :-1][mask]
    n = int(targets.numel())
    if n == 0:
        # Still run the output layer (on one position, times 0): under ZeRO-3 every rank must run the same
        # modules (its forward gathers the weights), and DDP expects its weights to get a (zero) gradient.
        return head(hidden[:, :1]).float().sum() * 0.0, 0
    weight = head.weight
    vocab = int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape
    if n * vocab <= LEAN_THRESHOLD:
        return _ce_chunk(h, head, targets), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        total = total + checkpoint(_ce_chunk, h[s:s + chunk_size], head, targets[s:s + chunk_size],
                                   use_reentrant=False)
    return total, n


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens of a batch after the causal shift (what `lm_loss_sum` averages over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

"""The language-model loss, computed at label positions only and in chunks.

Full-vocabulary fp32 logits for every position of every sequence are the largest tensor of a VLM step
(150k vocab x 8k tokens x 4 bytes = 4.9 GB). We gather the hidden states of the positions that have a
label, project them through the output layer a chunk at a time, and recompute each chunk's logits in
backward instead of keeping them: peak memory holds one chunk of logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
#: below this many logits (positions x vocab) a step keeps its logits: recomputing costs more than it saves
LEAN_THRESHOLD = 1 << 24


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch minus labels and the loop's bookkeeping keys (those start with `_`)."""
    return {k: v for k, v in batch.items() if k != "labels" and not k.startswith("_")}


def final_hidden(model: torch.nn.Module, batch: dict[str, Any], **kwargs: Any) -> tuple[torch.Tensor, torch.nn.Module, Any]:
    """Final (normed) hidden states (B, T, D), the output layer, and the backbone's outputs.

    Runs the backbone (`model.model`) instead of the ForConditionalGeneration wrapper so no logits are made.
    """
    hf = unwrap_peft(model)
    backbone = getattr(hf, "model", None)
    head = hf.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(f"{type(hf).__name__} has no backbone `.model` and output embeddings; cannot compute a lean loss")
    outputs = backbone(**model_inputs(batch), use_cache=False, return_dict=True, **kwargs)
    return outputs.last_hidden_state, head, outputs


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions t whose next token labels[t+1] is trained, and those targets (the causal shift)."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    return mask, shifted[mask]


def lm_loss_sum(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 2048) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over label tokens, and their count.

    Returning a sum (not a mean) lets the loop divide by the label tokens of the whole accumulated
    batch across processes: the mean over tokens, not a mean of per-micro-batch means.
    """
    mask, targets = label_positions(labels)
    h = hidden[:, :-1][mask]
    n = int(targets.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected (DDP/ZeRO expect every rank to backward)
    weight, bias = head.weight, getattr(head, "bias", None)
    vocab = weight.shape[0]
    if n * vocab <= LEAN_THRESHOLD:
        return _ce_chunk(h, weight, bias, targets), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        total = total + checkpoint(_ce_chunk, h[s:s + chunk_size], weight, bias, targets[s:s + chunk_size],
                                   use_reentrant=False)
    return total, n


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens of a batch after the causal shift (what `lm_loss_sum` averages over)."""
    return int((labels[:, 1:] != IGNORE).sum())

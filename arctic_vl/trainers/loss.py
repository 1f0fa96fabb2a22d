"""The language-model loss, computed at label positions only and in chunks, in lockstep across processes.

Full-vocabulary fp32 logits for every position of every sequence are the largest tensor of a VLM step
(150k vocab x 8k tokens x 4 bytes = 4.9 GB). We gather the hidden states of the positions that have a
label, project them through the output layer a chunk at a time, and recompute each chunk's logits in
backward instead of keeping them: peak memory holds one chunk of logits.

ZeRO-3 gathers a module's weights on every call of it (forward, and again in a checkpointed chunk's
recompute), so every process must call the output layer the same number of times. Whether a call is
chunked and how many chunks it has are therefore decided from a row count that every process agrees on
(the largest over processes, `agreed_rows`), never from this process's own labels; a process with fewer
rows pads its last chunks with an ignored row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from arctic_vl.constants import IGNORE_INDEX

#: below this many logits (positions x vocab) a step keeps its logits: recomputing costs more than it saves
LEAN_THRESHOLD = 1 << 24


def _ce_chunk(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor]:
    # Call the head module (not F.linear on head.weight): ZeRO-3 gathers a module's weights in its forward
    # hooks, and a LoRA-wrapped head adds its delta there.
    logits = head(hidden).float()
    return (F.cross_entropy(logits, targets, reduction="sum"),)


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions t whose next token labels[t+1] is trained, and those targets (the causal shift)."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def head_vocab(head: torch.nn.Module) -> int:
    """The output layer's vocabulary (its full size also when ZeRO-3 has partitioned the weight)."""
    weight = head.weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape


def _is_partitioned(param: torch.Tensor) -> bool:
    # ZeRO-3 marks partitioned parameters with ds_id; FSDP2 shards them as DTensors
    return hasattr(param, "ds_id") or type(param).__name__ == "DTensor" or hasattr(param, "_local_tensor")


def agreed_rows(rows: int, head: torch.nn.Module) -> int:
    """The row count that decides how a chunked head call runs: `rows` itself in one process or when the
    head's weights are whole on every process (DDP), else the largest `rows` over all processes (one MAX
    all-reduce), so that every process calls a partitioned head the same number of times."""
    if not (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return rows
    if not _is_partitioned(head.weight):
        return rows
    device = head.weight.device if head.weight.device.type != "meta" else torch.device("cpu")
    if torch_dist.get_backend() == "gloo":
        device = torch.device("cpu")
    t = torch.tensor([rows], dtype=torch.long, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item())


def chunked_head_sums(
    fn: Callable[..., tuple[torch.Tensor, ...]], rows: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
    *extra: torch.Tensor, chunk_size: int = 2048, lean_threshold: int = LEAN_THRESHOLD,
) -> tuple[torch.Tensor, ...]:
    """`fn(rows, head, targets, *extra)` (a tuple of summed losses) over the label rows, in lockstep.

    `rows` (N, H) hidden states of label positions, `targets` (N,) and each of `extra` (N, ...) aligned with
    them. Small calls (agreed rows x vocab <= `lean_threshold`) run `fn` once; larger ones run it in
    `ceil(agreed / chunk_size)` checkpointed chunks (logits recomputed in backward). A process with no rows,
    or fewer chunks' worth than the agreed count, runs `fn` on one padding row whose target is
    `IGNORE_INDEX` (so `fn` must give such a row zero loss, as `F.cross_entropy` does): the number of head
    calls, forward and backward, depends only on the agreed count.
    """
    n = int(targets.numel())
    agreed = agreed_rows(n, head)

    def padded(start: int, stop: int) -> tuple[torch.Tensor, ...]:
        if stop > start:
            return (rows[start:stop], targets[start:stop], *(e[start:stop] for e in extra))
        # zeros that stay in `rows`' graph: the backbone behind them gets its (zero) gradients in the same
        # order as on a process with real rows (ZeRO-3 reduces gradients in the order they become ready)
        pad_row = rows[:0].sum(0, keepdim=True)
        pad_target = targets.new_full((1,), IGNORE_INDEX)
        return (pad_row, pad_target, *(e.new_zeros((1, *e.shape[1:])) for e in extra))

    if agreed * head_vocab(head) <= lean_threshold:
        r, t, *e = padded(0, n)
        return fn(r, head, t, *e)
    # A frozen head (its weight needs no gradient) gets each chunk's gradient with respect to its rows computed
    # right after the chunk's forward (`_eager_chunk`): one head call per chunk, none in backward. A trained head
    # recomputes each chunk's logits in backward (checkpoint), so its weight gradient flows as usual.
    eager = not head.weight.requires_grad and torch.is_grad_enabled() and rows.requires_grad
    totals: tuple[torch.Tensor, ...] | None = None
    for c in range(math.ceil(agreed / chunk_size)):
        start, stop = min(c * chunk_size, n), min((c + 1) * chunk_size, n)
        r, t, *e = padded(start, stop)
        part = _eager_chunk(fn, r, head, t, *e) if eager else checkpoint(fn, r, head, t, *e, use_reentrant=False)
        totals = part if totals is None else tuple(a + b for a, b in zip(totals, part))
    assert totals is not None  # agreed > 0 here: the lean branch takes agreed == 0
    return totals


class _PrecomputedGrad(torch.autograd.Function):
    """`values` (k,) as a function of `rows` whose Jacobian `jac` (k, *rows.shape) is already known."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, jac: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(jac)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad_values: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (jac,) = ctx.saved_tensors
        scale = grad_values.to(jac.dtype).reshape(-1, *([1] * (jac.dim() - 1)))
        return (scale * jac).sum(0), None, None


def _eager_chunk(fn: Callable[..., tuple[torch.Tensor, ...]], rows: torch.Tensor, head: torch.nn.Module,
                 targets: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`fn` on one chunk with the gradient of each output with respect to `rows` taken at once (the chunk's
    logits are freed before the next chunk); backward then only multiplies by the outputs' gradients."""
    leaf = rows.detach().requires_grad_(True)
    with torch.enable_grad():
        outs = fn(leaf, head, targets, *extra)
        jac = []
        for i, out in enumerate(outs):
            grad = None
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out, leaf, retain_graph=i < len(outs) - 1, allow_unused=True)
            jac.append(grad if grad is not None else torch.zeros_like(leaf))
    values = torch.stack([out.detach().float() for out in outs])
    result = _PrecomputedGrad.apply(rows, torch.stack(jac), values)
    return tuple(result[i] for i in range(len(outs)))


def lm_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 2048
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross entropy over label tokens, and their count.

    Returning a sum (not a mean) lets the loop divide by the label tokens of the whole accumulated
    batch across processes: the mean over tokens, not a mean of per-micro-batch means. The output layer
    runs the same number of times on every process whatever its labels (`chunked_head_sums`): a micro-batch
    without labels still calls it (times zero), as ZeRO-3 and DDP need.
    """
    mask, targets = label_positions(labels)
    h = hidden[:, :-1][mask]
    (total,) = chunked_head_sums(_ce_chunk, h, head, targets, chunk_size=chunk_size)
    return total, int(targets.numel())


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens of a batch after the causal shift (what `lm_loss_sum` averages over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

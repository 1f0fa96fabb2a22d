"""The chunked LM loss: every path gives the same sums and gradients, and the number of output-layer calls
depends only on the agreed row count (one process here: the local count), never on which path a process takes."""

from __future__ import annotations

import pytest
import torch

from arctic_vl import IGNORE_INDEX, chunked_head_sums, lm_loss_sum
from arctic_vl.trainers.loss import _ce_chunk


def _setup(frozen: bool) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    head.weight.requires_grad_(not frozen)
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    labels = torch.randint(0, 300, (2, 40))
    labels[:, :5] = IGNORE_INDEX
    labels[1, 20:] = IGNORE_INDEX
    return head, hidden, labels


def _calls(head: torch.nn.Module) -> list[int]:
    calls = [0]
    head.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
def test_chunked_and_lean_paths_agree(frozen: bool) -> None:
    """The lean single call, the recomputed chunks (trained head) and the eager chunks (frozen head) give one
    loss and one gradient; a chunked call runs the head once per chunk forward, and again in backward only for
    a trained head (its recompute)."""
    results = []
    for threshold in (1 << 30, 0):
        head, hidden, labels = _setup(frozen)
        calls = _calls(head)
        (total,) = chunked_head_sums(_ce_chunk, hidden[:, :-1][labels[:, 1:] != IGNORE_INDEX], head,
                                     labels[:, 1:][labels[:, 1:] != IGNORE_INDEX], chunk_size=16,
                                     lean_threshold=threshold)
        forward_calls = calls[0]
        (total * 0.5).backward()
        grads = (hidden.grad.clone(), None if frozen else head.weight.grad.clone())
        results.append((float(total.detach()), grads, forward_calls, calls[0] - forward_calls))
    (lean, lean_grads, lean_fwd, lean_bwd), (chunked, chunked_grads, fwd, bwd) = results
    assert abs(lean - chunked) <= 1e-4 * abs(lean)
    assert torch.allclose(lean_grads[0], chunked_grads[0], atol=1e-5)
    if not frozen:
        assert torch.allclose(lean_grads[1], chunked_grads[1], atol=1e-5)
    n = int((_setup(frozen)[2][:, 1:] != IGNORE_INDEX).sum())
    assert (lean_fwd, lean_bwd) == (1, 0)
    assert fwd == -(-n // 16) and bwd == (0 if frozen else fwd)


def test_no_label_still_calls_the_head_and_reaches_the_backbone() -> None:
    """A padding sample (no label) runs the output layer once, with a zero loss whose graph reaches the hidden
    states (their zero gradients), as on a process with labels: ZeRO-3 reduces gradients in the order they
    become ready, so every process must reach the same parameters."""
    head, hidden, _ = _setup(frozen=False)
    calls = _calls(head)
    total, n = lm_loss_sum(hidden, head, torch.full((2, 40), IGNORE_INDEX))
    total.backward()
    assert (float(total.detach()), n, calls[0]) == (0.0, 0, 1)
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) == 0.0

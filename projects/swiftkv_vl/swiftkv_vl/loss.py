"""SwiftKV distillation loss as sums and counts (pure torch).

The trainer accumulates the sums and counts over every micro-batch of an optimiser step (and across ranks), then
normalises once::

    loss = kl_sum / label_tokens + hidden_loss_mult * mse_sum / hidden_tokens

so that KL terms are averaged over the label tokens of the whole accumulated batch and MSE terms over its
non-padding tokens (DESIGN.md; averaging per micro-batch would weight short micro-batches up).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from arctic_vl import IGNORE_INDEX, chunked_head_sums, label_positions

__all__ = ["swiftkv_distill_loss_sums"]


class _WeightHead(torch.nn.Module):
    """A bare output-layer weight as a module (callers that hold only the tensor: tests, plain models)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = weight  # a plain attribute: the caller's tensor, its graph kept

    def forward(self, rows: Tensor) -> Tensor:
        return rows @ self.weight.T


def _kl_chunk(
    student_rows: Tensor, head: torch.nn.Module, targets: Tensor, teacher_rows: Tensor, row_weight: Tensor,
    row_image: Tensor, temperature: float, with_ce: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(image, text) sums of ``w * T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the rows, in fp32,
    and the student's and the teacher's cross-entropy sums on the targets (metrics, without a graph).

    One call of the output layer for student and teacher rows together (under ZeRO-3 each call gathers its
    weights); rows whose target is IGNORE_INDEX (the core's lockstep padding) count nothing.
    """
    n = student_rows.shape[0]
    logits = head(torch.cat([student_rows, teacher_rows.to(student_rows.dtype)])).float()
    student_logp = F.log_softmax(logits[:n] / temperature, dim=-1)
    with torch.no_grad():  # the teacher is a target: no graph through it even if its hidden states carry one
        teacher_logp = F.log_softmax(logits[n:].detach() / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    kl = kl * (temperature**2) * row_weight * (targets != IGNORE_INDEX)
    ce_student = ce_teacher = logits.new_zeros(())
    if with_ce:
        with torch.no_grad():  # each model's own cross entropy on the labels (temperature 1): metrics, no graph
            ce_student = F.cross_entropy(logits[:n].detach(), targets, reduction="sum")
            ce_teacher = F.cross_entropy(logits[n:].detach(), targets, reduction="sum")
    return (kl * row_image).sum(), (kl * (1 - row_image)).sum(), ce_student, ce_teacher


def swiftkv_distill_loss_sums(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head: torch.nn.Module | Tensor,
    labels: Tensor,
    attention_mask: Tensor | None,
    sample_weight: Tensor | None,
    *,
    temperature: float,
    student_mid: Tensor | None = None,
    teacher_mid: Tensor | None = None,
    has_image: Tensor | None = None,
    chunk_size: int = 1024,
    with_ce: bool = False,
) -> dict[str, Tensor]:
    """Sums and counts of the SwiftKV distillation loss for one micro-batch.

    Args:
        student_hidden, teacher_hidden: final hidden states ``(B, T, D)`` (after the final norm).
        lm_head: the output layer (a module, called so that ZeRO-3 gathers its weights), or its ``(V, D)`` weight;
            logits are computed at label positions only, through the core's `chunked_head_sums` (never a full
            ``(B, T, V)`` tensor; large vocabularies in chunks recomputed in backward, the same number of output-layer
            calls on every rank).
        labels: ``(B, T)`` with ``IGNORE_INDEX`` for positions without a label. Causal shift: position t predicts
            ``labels[:, t + 1]``.
        attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding (None: all real). Selects the MSE tokens.
        sample_weight: ``(B,)`` weight ``w_s`` of each sample (``vision_loss_weight`` / ``text_loss_weight``);
            None: all 1.
        temperature: the distillation temperature T (KL of the softened distributions, scaled by ``T**2``).
        student_mid, teacher_mid: ``(B, T, D)`` hidden states at ``hidden_loss_layer``; None: no MSE term.
        has_image: ``(B,)`` bool, which samples hold an image, for the image/text split (None: all text-only).
        chunk_size: label positions per logits chunk.
        with_ce: also ``student_ce_sum`` and ``teacher_ce_sum``, each model's cross entropy on the labels at
            temperature 1 (a metric: no graph), summed over the label tokens.

    Returns:
        A dict of 0-d tensors: ``kl_sum`` (sum over label tokens of ``w_s * T^2 * KL``), ``mse_sum`` (sum over
        non-padding tokens of ``w_s * mean_d (h_s - h_t)^2``), ``label_tokens``, ``hidden_tokens`` (counts, not
        weighted), and each of them split as ``*_image`` / ``*_text`` by ``has_image``. The sums carry the graph to
        the student tensors; the counts are float tensors on the same device.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student/teacher hidden shapes differ: {student_hidden.shape} vs {teacher_hidden.shape}"
        )
    batch, seq_len, _ = student_hidden.shape
    device = student_hidden.device
    if labels.shape != (batch, seq_len):
        raise ValueError(f"labels must be (B, T) = {(batch, seq_len)}, got {tuple(labels.shape)}")

    weight = (
        torch.ones(batch, device=device, dtype=torch.float32)
        if sample_weight is None
        else sample_weight.to(device=device, dtype=torch.float32).reshape(batch)
    )
    image = (
        torch.zeros(batch, device=device, dtype=torch.bool)
        if has_image is None
        else has_image.to(device=device, dtype=torch.bool).reshape(batch)
    )

    # --- KL on label positions: position t (t < T-1) is scored when labels[:, t+1] is a label.
    mask, targets = label_positions(labels)
    rows_b = mask.nonzero(as_tuple=True)[0]
    row_weight = weight[rows_b]
    row_image = image[rows_b]
    head = lm_head if isinstance(lm_head, torch.nn.Module) else _WeightHead(lm_head)
    chunk = functools.partial(_kl_chunk, temperature=temperature, with_ce=with_ce)
    kl_image, kl_text, ce_student, ce_teacher = chunked_head_sums(
        chunk, student_hidden[:, :-1][mask], head, targets, teacher_hidden[:, :-1][mask], row_weight,
        row_image.float(), chunk_size=chunk_size,
    )

    label_image = row_image.sum().float()
    label_total = torch.tensor(float(rows_b.numel()), device=device)

    # --- hidden MSE at every non-padding token.
    token_mask = (
        torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device=device).bool()
    )
    mse_image = student_hidden.new_zeros((), dtype=torch.float32)
    mse_text = student_hidden.new_zeros((), dtype=torch.float32)
    hidden_image = torch.zeros((), device=device)
    hidden_total = torch.zeros((), device=device)
    if (student_mid is None) != (teacher_mid is None):
        raise ValueError("pass both student_mid and teacher_mid, or neither")
    if student_mid is not None:
        per_token = (student_mid.float() - teacher_mid.detach().float()).pow(2).mean(-1)  # (B, T)
        per_token = per_token * weight[:, None]
        per_token = per_token.masked_fill(~token_mask, 0.0)
        per_sample = per_token.sum(-1)
        mse_image = per_sample[image].sum()
        mse_text = per_sample[~image].sum()
        tokens_per_sample = token_mask.sum(-1).float()
        hidden_image = tokens_per_sample[image].sum()
        hidden_total = tokens_per_sample.sum()

    out = {"student_ce_sum": ce_student, "teacher_ce_sum": ce_teacher} if with_ce else {}
    return {
        **out,
        "kl_sum": kl_image + kl_text,
        "kl_sum_image": kl_image,
        "kl_sum_text": kl_text,
        "label_tokens": label_total,
        "label_tokens_image": label_image,
        "label_tokens_text": label_total - label_image,
        "mse_sum": mse_image + mse_text,
        "mse_sum_image": mse_image,
        "mse_sum_text": mse_text,
        "hidden_tokens": hidden_total,
        "hidden_tokens_image": hidden_image,
        "hidden_tokens_text": hidden_total - hidden_image,
    }

"""Detection and span LM loss SUMS of one micro-batch; the trainer divides them by step-wide global counts.

Per matched (query, object) pair: L1 = |b - g|_1 over the four normalised cxcywh coordinates, GIoU term = 1 - GIoU.
Objectness: sigmoid focal loss (alpha, gamma) over EVERY query of every real sample, target 1 at matched queries.
All three are sums here; the trainer divides each by the number of ground-truth objects of the whole accumulated
batch on all processes (DETR / Deformable DETR normalise the focal term the same way: by boxes, not queries).
Caption: next-token cross entropy over the caption tokens of the objects matched in the LAST decoder layer, each
caption decoded from its MATCHED query's state; divided by the step's caption tokens.

ZeRO-3 / DDP: every module runs the same number of times on every rank whatever the data: the caption decoder
runs once per micro-batch, on a zero-weighted dummy caption when the batch has no object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from arctic_vl import IGNORE_INDEX, LEAN_THRESHOLD, chunked_head_sums, label_positions

from .boxes import cxcywh_to_xyxy, paired_generalized_box_iou, sigmoid_focal_loss
from .head import DetectionHead, DetectionOutput
from .matcher import MatcherWeights, hungarian_match
from .spans import STUDENT, TEACHER


@dataclass
class DetectionSums:
    """Sums (tensors in the graph) and their counts for one micro-batch. `*_aux` sum the earlier decoder layers."""

    l1: torch.Tensor
    giou: torch.Tensor
    focal: torch.Tensor
    caption: torch.Tensor
    objects: int
    caption_tokens: int
    l1_aux: torch.Tensor
    giou_aux: torch.Tensor
    focal_aux: torch.Tensor
    matched: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _layer_sums(boxes: torch.Tensor, logits: torch.Tensor, gt: list[torch.Tensor], real: torch.Tensor,
                weights: MatcherWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """(L1 sum, GIoU-term sum, focal sum, matches) of one decoder layer's (B, Q, 4) boxes and (B, Q) logits."""
    matches = hungarian_match(boxes, logits, gt, weights)
    device = boxes.device
    b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)]).to(device)
    q_idx = torch.cat([q for q, _ in matches]).to(device)
    target = torch.cat([gt[b][t] for b, (_, t) in enumerate(matches)]).to(device=device, dtype=torch.float32)
    pred = boxes[b_idx, q_idx].float()
    l1 = (pred - target).abs().sum()
    giou = (1 - paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))).sum()
    onehot = torch.zeros_like(logits, dtype=torch.float32)
    onehot[b_idx, q_idx] = 1.0
    focal = (sigmoid_focal_loss(logits.float(), onehot, weights.focal_alpha, weights.focal_gamma)
             * real[:, None].float()).sum()
    return l1, giou, focal, matches


def detection_loss_sums(head: DetectionHead, out: DetectionOutput, gt_boxes: list[torch.Tensor],
                        captions: list[list[list[int]]], real: torch.Tensor, weights: MatcherWeights,
                        aux: bool) -> DetectionSums:
    """Match every decoder layer (only the last with `aux` False) and sum its losses; captions of the last layer.

    `gt_boxes` B tensors (N_b, 4) normalised cxcywh, `captions` per sample N_b token lists, `real` (B,) bool
    (False: a padding sample, which trains nothing).
    """
    layers = out.boxes.shape[0]
    l1, giou, focal, matches = _layer_sums(out.boxes[-1], out.logits[-1], gt_boxes, real, weights)
    zero = out.boxes.sum() * 0.0
    l1_aux = giou_aux = focal_aux = zero
    if aux:
        for layer in range(layers - 1):
            a, g, f, _ = _layer_sums(out.boxes[layer], out.logits[layer], gt_boxes, real, weights)
            l1_aux, giou_aux, focal_aux = l1_aux + a, giou_aux + g, focal_aux + f
    caption_sum, caption_tokens = caption_loss_sum(head, out, matches, captions)
    objects = sum(int(g.shape[0]) for g in gt_boxes)
    return DetectionSums(l1, giou, focal, caption_sum, objects, caption_tokens, l1_aux, giou_aux, focal_aux, matches)


def caption_loss_sum(head: DetectionHead, out: DetectionOutput, matches: list[tuple[torch.Tensor, torch.Tensor]],
                     captions: list[list[list[int]]]) -> tuple[torch.Tensor, int]:
    """Cross-entropy sum over the caption tokens of every matched object (query q's caption is its matched
    object's, decoded from the last layer's state of q), and the token count. With no object the decoder still
    runs once, on a zero-weighted dummy."""
    states = out.states[-1]
    rows, texts = [], []
    for b, (q_idx, t_idx) in enumerate(matches):
        for q, t in zip(q_idx.tolist(), t_idx.tolist()):
            rows.append((b, q))
            texts.append(captions[b][t])
    device = states.device
    if not rows:  # keep the module calls of a batch with objects (ZeRO-3 hangs otherwise)
        dummy = torch.full((1, 2), head.config.caption_end_id, dtype=torch.long, device=device)
        first = torch.zeros(1, dtype=torch.long, device=device)
        return head.caption_logits(states[0, :1], dummy, out.caption_context(first, first)).sum() * 0.0, 0
    length = max(len(t) for t in texts)
    targets = torch.full((len(texts), length), IGNORE_INDEX, dtype=torch.long)
    for i, t in enumerate(texts):
        targets[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
    targets = targets.to(device)
    b_idx = torch.tensor([b for b, _ in rows], device=device)
    q_idx = torch.tensor([q for _, q in rows], device=device)
    logits = head.caption_logits(states[b_idx, q_idx], targets, out.caption_context(b_idx, q_idx))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------ span LM loss
def _span_ce(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
             kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ce = F.cross_entropy(head(hidden).float(), targets, reduction="none")  # 0 at IGNORE_INDEX (padding rows)
    return (ce * (kinds == TEACHER)).sum(), (ce * (kinds == STUDENT)).sum()


def span_lm_loss_sums(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, spans: torch.Tensor,
                      chunk_size: int = 2048, lean_threshold: int = LEAN_THRESHOLD,
                      ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(teacher CE sum, student CE sum, teacher tokens, student tokens) of next-token prediction at label positions.

    One pass over the label positions through the core's `chunked_head_sums`: the output layer runs the same
    number of times on every rank (chunks decided from the row count all ranks agree on, at least one call
    even with no label), large vocabularies in recomputed chunks like the core's lean loss.
    """
    mask, targets = label_positions(labels)
    kinds = spans[:, 1:][mask]
    h = hidden[:, :-1][mask]
    n_teacher, n_student = int((kinds == TEACHER).sum()), int((kinds == STUDENT).sum())
    t, s = chunked_head_sums(_span_ce, h, head, targets, kinds, chunk_size=chunk_size, lean_threshold=lean_threshold)
    return t, s, n_teacher, n_student

"""Hungarian matching of predicted queries to ground-truth objects (scipy's `linear_sum_assignment`).

Per sample, the cost of giving ground-truth object j to query i is

    cost_bbox * |b_i - g_j|_1  +  cost_giou * (1 - GIoU(b_i, g_j))  +  cost_objectness * c_obj(i)

with boxes normalised (cx, cy, w, h) (see `bbu_detection.boxes`) and the focal objectness cost of
Deformable DETR, `c_obj = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))` for the
query's objectness probability p (cheap where the query already says "object"). The matrix is computed
in fp32 whatever the training dtype (bf16 costs tie and flip assignments), without gradients, and any
non-finite entry (a NaN box in a diverging step) is replaced by a large finite cost before assignment:
scipy refuses NaN and infinite matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .boxes import cxcywh_to_xyxy, generalized_box_iou

#: what a non-finite cost becomes (far above any real cost: L1 <= 4, 1 - GIoU <= 2, focal cost ~ 10)
NONFINITE_COST = 1.0e6


@dataclass(frozen=True)
class MatcherWeights:
    """The cost weights (the loss weights of DETR by default)."""

    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_objectness: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def objectness_cost(logits: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(Q,) focal matching cost of calling each query an object (lower where the query is confident)."""
    p = logits.float().sigmoid()
    eps = 1e-8
    pos = alpha * (1 - p) ** gamma * -(p + eps).log()
    neg = (1 - alpha) * p ** gamma * -(1 - p + eps).log()
    return pos - neg


def cost_matrix(pred_boxes: torch.Tensor, pred_logits: torch.Tensor, gt_boxes: torch.Tensor,
                weights: MatcherWeights = MatcherWeights()) -> torch.Tensor:
    """(Q, N) fp32 matching cost for one sample: queries (Q, 4) cxcywh + (Q,) logits vs objects (N, 4) cxcywh."""
    with torch.no_grad():
        pb, gb = pred_boxes.detach().float(), gt_boxes.detach().float().to(pred_boxes.device)
        cost = weights.cost_bbox * torch.cdist(pb, gb, p=1)
        cost = cost + weights.cost_giou * (1 - generalized_box_iou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(gb)))
        obj = objectness_cost(pred_logits.detach(), weights.focal_alpha, weights.focal_gamma)
        cost = cost + weights.cost_objectness * obj[:, None]
        return torch.nan_to_num(cost, nan=NONFINITE_COST, posinf=NONFINITE_COST, neginf=-NONFINITE_COST)


def assign(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of every column (object) to a distinct row (query) of a (Q, N) matrix.

    Returns (query indices, object indices), sorted by query. N = 0 gives two empty tensors; N > Q is a
    ValueError: some object could not get a query.
    """
    q, n = cost.shape
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    if n > q:
        raise ValueError(f"{n} ground-truth objects but only {q} queries: every object needs its own query; "
                         f"raise model.detection.num_queries to at least {n} (or drop such records)")
    matrix = cost.detach().float().cpu().numpy().astype(np.float64)
    if not np.isfinite(matrix).all():  # callers pass `cost_matrix` output; this guards direct use
        matrix = np.nan_to_num(matrix, nan=NONFINITE_COST, posinf=NONFINITE_COST, neginf=-NONFINITE_COST)
    rows, cols = linear_sum_assignment(matrix)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def hungarian_match(pred_boxes: torch.Tensor, pred_logits: torch.Tensor, gt_boxes: list[torch.Tensor],
                    weights: MatcherWeights = MatcherWeights()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample of a batch: (query indices, object indices) of the optimal matching, sorted by query.

    `pred_boxes` (B, Q, 4) cxcywh in [0, 1], `pred_logits` (B, Q) objectness logits, `gt_boxes` B tensors
    (N_b, 4) cxcywh. Index tensors live on the CPU.
    """
    if len(gt_boxes) != pred_boxes.shape[0]:
        raise ValueError(f"{len(gt_boxes)} target sets for a batch of {pred_boxes.shape[0]} samples")
    out = []
    for b, gt in enumerate(gt_boxes):
        if gt.shape[0] == 0:
            out.append(assign(pred_boxes.new_zeros((pred_boxes.shape[1], 0))))
            continue
        out.append(assign(cost_matrix(pred_boxes[b], pred_logits[b], gt, weights)))
    return out

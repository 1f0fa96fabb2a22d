"""Box geometry and the sigmoid focal loss, in one convention used everywhere in this project.

Convention: a predicted or target box is `(cx, cy, w, h)` normalised by the image's width and height (so
every value is in [0, 1] for a box inside the image); `xyxy` is `(x1, y1, x2, y2)` in the same normalised
units. Records and predictions on disk use PIXEL `[x1, y1, x2, y2]` (`bbox_2d`); `pixel_xyxy_to_cxcywh` and
`cxcywh_to_pixel_xyxy` are the only crossings. Normalised coordinates do not change when the processor
resizes the whole image, so targets are computed once, from the original image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size -> corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> centre/size."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def pixel_xyxy_to_cxcywh(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Pixel `[x1, y1, x2, y2]` of a `width` x `height` image -> normalised `(cx, cy, w, h)`."""
    scale = boxes.new_tensor([width, height, width, height])
    return xyxy_to_cxcywh(boxes / scale)


def cxcywh_to_pixel_xyxy(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """Normalised `(cx, cy, w, h)` -> pixel `[x1, y1, x2, y2]` of a `width` x `height` image, clipped to it."""
    scale = boxes.new_tensor([width, height, width, height])
    return (cxcywh_to_xyxy(boxes).clamp(0.0, 1.0)) * scale


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...) area (0 for an inverted box)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _iou_parts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of broadcastable xyxy boxes `a` and `b` (both (..., 4))."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return inter / union, union


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    iou, union = _iou_parts(a, b)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) xyxy -> (N, M) pairwise IoU."""
    return _iou_parts(boxes1[:, None, :], boxes2[None, :, :])[0]


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) xyxy -> (N, M) pairwise generalized IoU (Rezatofighi et al. 2019), in [-1, 1].

    Degenerate (zero-area) boxes give NaN where both union and enclosing box are empty; the matcher
    replaces non-finite costs, and predicted boxes (a sigmoid of a size) never have zero area.
    """
    return _giou(boxes1[:, None, :], boxes2[None, :, :])


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (N, 4) xyxy -> (N,) generalized IoU of each pair (the diagonal of the pairwise matrix)."""
    return _giou(boxes1, boxes2)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017, RetinaNet), NOT reduced.

    `alpha_t * (1 - p_t) ** gamma * BCE(logits, targets)` with `p_t` the probability of the true label and
    `alpha_t = alpha` for positives, `1 - alpha` for negatives (`alpha < 0`: no alpha weighting). The
    caller decides the normalisation (see `bbu_detection.losses`).
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss

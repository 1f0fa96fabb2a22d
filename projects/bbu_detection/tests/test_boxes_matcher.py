"""Box utilities and focal loss against transformers' own detection loss code; the matcher against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from bbu_detection.boxes import (
    cxcywh_to_pixel_xyxy,
    cxcywh_to_xyxy,
    generalized_box_iou,
    paired_generalized_box_iou,
    pixel_xyxy_to_cxcywh,
    sigmoid_focal_loss,
    xyxy_to_cxcywh,
)
from bbu_detection.matcher import NONFINITE_COST, MatcherWeights, assign, cost_matrix, hungarian_match
from transformers.loss import loss_for_object_detection as oracle


def _random_cxcywh(n: int, g: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=g) * 0.8 + 0.1
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.02
    return torch.cat([centre, size], dim=1).double()


def test_box_conversion_equals_transformers():
    g = torch.Generator().manual_seed(0)
    boxes = _random_cxcywh(50, g)
    assert torch.equal(cxcywh_to_xyxy(boxes), oracle.center_to_corners_format(boxes))
    assert torch.allclose(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes, atol=1e-15)
    # a batch dimension converts the same
    assert torch.equal(cxcywh_to_xyxy(boxes.view(5, 10, 4)), oracle.center_to_corners_format(boxes).view(5, 10, 4))


def test_pixel_round_trip():
    pixel = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 64.0, 48.0]])
    norm = pixel_xyxy_to_cxcywh(pixel, 64, 48)
    assert torch.allclose(norm[0], torch.tensor([20 / 64, 30 / 48, 20 / 64, 20 / 48]))
    assert torch.allclose(norm[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.allclose(cxcywh_to_pixel_xyxy(norm, 64, 48), pixel)
    # a prediction reaching outside the image is clipped to it
    outside = torch.tensor([[0.9, 0.5, 0.4, 0.2]])
    assert torch.allclose(cxcywh_to_pixel_xyxy(outside, 64, 48), torch.tensor([[44.8, 19.2, 64.0, 28.8]]))


def test_generalized_box_iou_equals_transformers():
    g = torch.Generator().manual_seed(1)
    a, b = cxcywh_to_xyxy(_random_cxcywh(20, g)), cxcywh_to_xyxy(_random_cxcywh(30, g))
    ours, theirs = generalized_box_iou(a, b), oracle.generalized_box_iou(a, b)
    assert ours.shape == (20, 30)
    assert torch.allclose(ours, theirs, atol=1e-12, rtol=0)
    # identical boxes: 1; disjoint far apart: negative; the paired form is the diagonal
    assert torch.allclose(generalized_box_iou(a, a).diagonal(), torch.ones(20, dtype=a.dtype))
    assert torch.allclose(paired_generalized_box_iou(a, b[:20]), theirs[torch.arange(20), torch.arange(20)], atol=1e-12)
    far = torch.tensor([[0.0, 0.0, 0.1, 0.1]]), torch.tensor([[0.9, 0.9, 1.0, 1.0]])
    assert float(generalized_box_iou(*far)) < -0.9


def test_sigmoid_focal_loss_equals_transformers():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 100, generator=g).double() * 3
    targets = (torch.rand(4, 100, generator=g) < 0.1).double()
    for alpha, gamma in ((0.25, 2.0), (0.5, 1.0), (-1.0, 2.0)):
        ours = sigmoid_focal_loss(logits, targets, alpha, gamma)
        assert ours.shape == logits.shape  # unreduced
        theirs = oracle.sigmoid_focal_loss(logits, targets, num_boxes=7.0, alpha=alpha, gamma=gamma)
        assert torch.allclose(ours.mean(1).sum() / 7.0, theirs, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------- matcher
def _brute_force(cost: torch.Tensor) -> float:
    q, n = cost.shape
    return min(sum(float(cost[rows[j], j]) for j in range(n)) for rows in itertools.permutations(range(q), n))


def _total(cost: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    return float(sum(float(cost[r, c]) for r, c in zip(rows.tolist(), cols.tolist())))


@pytest.mark.parametrize("seed", range(12))
def test_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    q = int(torch.randint(1, 7, (1,), generator=g))
    n = int(torch.randint(0, q + 1, (1,), generator=g))
    pred, gt = _random_cxcywh(q, g).float(), _random_cxcywh(n, g).float()
    logits = torch.randn(q, generator=g)
    cost = cost_matrix(pred, logits, gt)
    rows, cols = hungarian_match(pred[None], logits[None], [gt])[0]
    assert len(rows) == n and sorted(cols.tolist()) == list(range(n))  # every object exactly once
    assert len(set(rows.tolist())) == n and rows.tolist() == sorted(rows.tolist())  # distinct queries, sorted
    if n:
        assert _total(cost, rows, cols) == pytest.approx(_brute_force(cost), abs=1e-5)


def test_matcher_ties_give_an_optimal_assignment():
    # every query identical: all assignments cost the same; integer costs with many ties
    cost = torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0], [2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    rows, cols = assign(cost)
    assert _total(cost, rows, cols) == _brute_force(cost) == 3.0
    same = torch.full((5, 3), 0.5)
    rows, cols = assign(same)
    assert _total(same, rows, cols) == 1.5 and len(set(rows.tolist())) == 3
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(4, 1)
    gt = torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]])
    rows, cols = hungarian_match(pred[None], torch.zeros(1, 4), [gt])[0]
    assert len(set(rows.tolist())) == 2 and sorted(cols.tolist()) == [0, 1]


def test_matcher_zero_objects_and_too_many_objects():
    pred, logits = torch.rand(1, 3, 4) * 0.5 + 0.2, torch.zeros(1, 3)
    rows, cols = hungarian_match(pred, logits, [torch.zeros(0, 4)])[0]
    assert rows.numel() == 0 and cols.numel() == 0
    with pytest.raises(ValueError, match=r"4 ground-truth objects but only 3 queries.*num_queries to at least 4"):
        hungarian_match(pred, logits, [torch.rand(4, 4) * 0.3 + 0.1])


def test_matcher_replaces_non_finite_costs_and_uses_fp32():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [float("nan"), 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    gt = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]])
    logits = torch.tensor([0.0, float("inf"), 0.0])
    cost = cost_matrix(pred.bfloat16(), logits.bfloat16(), gt.bfloat16())
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()
    assert (cost[1] == NONFINITE_COST).all()  # the NaN query costs the most, so it is never chosen
    rows, cols = hungarian_match(pred[None], logits[None], [gt])[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_cost_weights_change_the_choice():
    # query 0 is nearer in L1, query 1 overlaps better (GIoU): the weights decide
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    pred = torch.tensor([[0.5, 0.5, 0.25, 0.25], [0.6, 0.6, 0.45, 0.45]])
    logits = torch.zeros(2)
    l1_only = MatcherWeights(cost_bbox=1.0, cost_giou=0.0, cost_objectness=0.0)
    pick = hungarian_match(pred[None], logits[None], [gt], l1_only)[0][0].tolist()
    c = cost_matrix(pred, logits, gt, l1_only)
    assert pick == [int(c[:, 0].argmin())]
    obj_only = MatcherWeights(cost_bbox=0.0, cost_giou=0.0, cost_objectness=1.0)
    assert hungarian_match(pred[None], torch.tensor([[-5.0, 5.0]]), [gt], obj_only)[0][0].tolist() == [1]

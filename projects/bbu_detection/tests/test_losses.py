"""Loss sums: captions follow the MATCHED order, the span LM loss against the core's LM loss, focal normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bbu_detection.boxes import sigmoid_focal_loss
from bbu_detection.head import DetectionHead, DetectionHeadConfig, DetectionOutput
from bbu_detection.losses import caption_loss_sum, detection_loss_sums, span_lm_loss_sums
from bbu_detection.matcher import MatcherWeights
from bbu_detection.spans import STUDENT, TEACHER

from arctic_vl import IGNORE_INDEX, lm_loss_sum

CONFIG = DetectionHeadConfig(num_queries=4, decoder_layers=1, caption_layers=1, d_model=16, heads=2,
                             hidden_size=8, vision_size=8, vocab_size=30, caption_end_id=2, max_caption_tokens=4)


def test_captions_follow_the_matched_order():
    torch.manual_seed(0)
    head = DetectionHead(CONFIG)
    # query 3 sits on object 0, query 1 on object 1: the matching is NOT the ground-truth order
    gt = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])
    boxes = torch.tensor([[[0.5, 0.1, 0.05, 0.05], [0.7, 0.7, 0.2, 0.2], [0.9, 0.9, 0.05, 0.05],
                           [0.2, 0.2, 0.1, 0.1]]])
    states = torch.randn(1, 1, 4, 16)
    out = DetectionOutput(boxes[None], torch.zeros(1, 1, 4), states)
    captions = [[[5, 6, 2], [7, 2]]]
    sums = detection_loss_sums(head, out, [gt], captions, torch.ones(1, dtype=torch.bool), MatcherWeights(), aux=False)
    q, t = sums.matched[0]
    assert dict(zip(q.tolist(), t.tolist())) == {1: 1, 3: 0}
    assert float(sums.l1) == 0.0 and abs(float(sums.giou)) < 1e-6  # perfect boxes
    assert sums.caption_tokens == 5
    # the caption loss is query 3 -> caption [5, 6, 2] and query 1 -> [7, 2]
    own = F.cross_entropy(head.caption_logits(states[0, 0, [3]], torch.tensor([[5, 6, 2]]))[0], torch.tensor([5, 6, 2]),
                          reduction="sum")
    own = own + F.cross_entropy(head.caption_logits(states[0, 0, [1]], torch.tensor([[7, 2]]))[0], torch.tensor([7, 2]),
                                reduction="sum")
    assert torch.allclose(sums.caption, own, atol=1e-5)
    ground_truth_order, _ = caption_loss_sum(head, out, [(torch.tensor([1, 3]), torch.tensor([0, 1]))], captions)
    assert not torch.allclose(ground_truth_order, own)


def test_focal_sum_over_all_queries_of_real_samples():
    torch.manual_seed(1)
    head = DetectionHead(CONFIG)
    logits = torch.randn(1, 2, 4)
    boxes = torch.rand(1, 2, 4, 4) * 0.3 + 0.2
    out = DetectionOutput(boxes, logits, torch.randn(1, 2, 4, 16))
    gt = [torch.tensor([[0.3, 0.3, 0.1, 0.1]]), torch.zeros(0, 4)]
    real = torch.tensor([True, False])  # the second sample pads a short batch: it trains nothing
    sums = detection_loss_sums(head, out, gt, [[[4, 2]], []], real, MatcherWeights(), aux=False)
    q = int(sums.matched[0][0])
    target = torch.zeros(4)
    target[q] = 1
    assert torch.allclose(sums.focal, sigmoid_focal_loss(logits[0, 0], target).sum(), atol=1e-6)


def test_span_lm_loss_equals_the_core_lm_loss():
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(2, 9, 8)
    labels = torch.full((2, 9), IGNORE_INDEX)
    spans = torch.zeros(2, 9, dtype=torch.long)
    labels[0, 2:4], spans[0, 2:4] = torch.tensor([5, 6]), TEACHER
    labels[0, 6:8], spans[0, 6:8] = torch.tensor([7, 8]), STUDENT
    labels[1, 3:6], spans[1, 3:6] = torch.tensor([9, 10, 11]), STUDENT
    t, s, nt, ns = span_lm_loss_sums(hidden, head, labels, spans)
    total, n = lm_loss_sum(hidden, head, labels)
    assert (nt, ns, n) == (2, 5, 7)
    assert torch.allclose(t + s, total, atol=1e-5)
    student_only = torch.where(spans == STUDENT, labels, torch.full_like(labels, IGNORE_INDEX))
    assert torch.allclose(s, lm_loss_sum(hidden, head, student_only)[0], atol=1e-5)
    # the chunked, recomputed path (large vocabularies) gives the same sums
    t2, s2, _, _ = span_lm_loss_sums(hidden, head, labels, spans, chunk_size=16, lean_threshold=0)
    assert torch.allclose(t2, t, atol=1e-6) and torch.allclose(s2, s, atol=1e-6)
    # no label at all: the output layer still runs (same module calls on every rank), the sums are 0
    hidden.requires_grad_(True)
    t3, s3, nt3, ns3 = span_lm_loss_sums(hidden, head, torch.full((2, 9), IGNORE_INDEX), spans)
    (t3 + s3).backward()
    assert (nt3, ns3) == (0, 0) and float(t3.detach()) == 0.0 and head.weight.grad is not None

"""DetectionHead: shapes, shifted teacher forcing, save/load, and every parameter in the graph with no objects."""

from __future__ import annotations

import torch
from bbu_detection.head import (
    DetectionHead,
    DetectionHeadConfig,
    ResidualAdapter,
    load_detection_head,
    save_detection_head,
    sine_position,
)
from bbu_detection.losses import detection_loss_sums
from bbu_detection.matcher import MatcherWeights

CONFIG = DetectionHeadConfig(num_queries=5, decoder_layers=2, caption_layers=2, d_model=32, heads=4,
                             hidden_size=24, vision_size=24, vocab_size=50, caption_end_id=3, max_caption_tokens=6)


def _inputs(b: int = 2, t: int = 7, v: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lang = torch.randn(b, t, 24, generator=g)
    lmask = torch.ones(b, t, dtype=torch.bool)
    lmask[1, 5:] = False  # padding
    vis = torch.randn(b, v, 24, generator=g)
    vmask = torch.ones(b, v, dtype=torch.bool)
    vmask[0, 3:] = False
    xy = torch.rand(b, v, 2, generator=g)
    return lang, lmask, vis, vmask, xy


def _head(seed: int = 0) -> DetectionHead:
    torch.manual_seed(seed)
    return DetectionHead(CONFIG).eval()


def test_shapes_and_box_range():
    head = _head()
    out = head(*_inputs())
    assert out.boxes.shape == (2, 2, 5, 4) and out.logits.shape == (2, 2, 5) and out.states.shape == (2, 2, 5, 32)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    # untrained: the first layer's boxes are the reference grid, objectness at the focal prior
    assert torch.allclose(out.logits.sigmoid(), torch.full_like(out.logits, 0.01), atol=0.05)


def test_padding_is_masked():
    head = _head()
    lang, lmask, vis, vmask, xy = _inputs()
    base = head(lang, lmask, vis, vmask, xy)
    lang2, vis2 = lang.clone(), vis.clone()
    lang2[1, 5:] = 1e3  # padded language tokens
    vis2[0, 3:] = -1e3  # padded vision tokens
    again = head(lang2, lmask, vis2, vmask, xy)
    assert torch.allclose(base.boxes, again.boxes, atol=1e-6) and torch.allclose(base.logits, again.logits, atol=1e-6)


def test_adapter_starts_as_identity():
    adapter = ResidualAdapter(16, 8)
    x = torch.randn(3, 16)
    assert torch.equal(adapter(x), x) and adapter.down.out_features == 2


def test_sine_positions_peak_at_equal_coordinates():
    xs = torch.linspace(0, 1, 21)[:, None].expand(-1, 2)
    emb = sine_position(xs, 32)
    sim = emb @ emb.T
    assert (sim.argmax(1) == torch.arange(21)).all()


def test_caption_teacher_forcing_is_shifted():
    head = _head()
    states = torch.randn(3, 32)
    tokens = torch.tensor([[7, 8, 9, 3], [10, 11, 3, 3], [12, 3, 3, 3]])
    logits = head.caption_logits(states, tokens)
    assert logits.shape == (3, 4, 50)
    # the logits at position i predict token i: they read tokens < i only (position 0 reads the BOS)
    for i in range(4):
        changed = tokens.clone()
        changed[:, i] = 20
        other = head.caption_logits(states, changed)
        assert torch.allclose(other[:, :i + 1], logits[:, :i + 1], atol=1e-6), i
        if i < 3:
            assert not torch.allclose(other[:, i + 1:], logits[:, i + 1:])
    # greedy decoding is the argmax chain of the same logits
    texts = head.generate_captions(states)
    seq = torch.tensor([t + [3] * (6 - len(t)) for t in texts])
    again = head.caption_logits(states, torch.cat([seq, seq[:, :1]], 1)[:, :6]).argmax(-1)
    for row, t in enumerate(texts):
        assert again[row, :len(t)].tolist() == t


def test_save_load_round_trip(tmp_path):
    head = _head(3)
    save_detection_head(head, tmp_path / "head")
    loaded = load_detection_head(tmp_path / "head").eval()
    assert loaded.config == head.config
    a, b = head(*_inputs()), loaded(*_inputs())
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.logits, b.logits)


def test_every_parameter_joins_the_graph_without_objects():
    """A batch with no objects still runs (and gives grads to) every head module: what ZeRO-3 needs."""
    head = _head().train()
    out = head(*_inputs())
    gt = [torch.zeros(0, 4), torch.zeros(0, 4)]
    sums = detection_loss_sums(head, out, gt, [[], []], torch.ones(2, dtype=torch.bool), MatcherWeights(), aux=True)
    assert sums.objects == 0 and sums.caption_tokens == 0 and float(sums.caption.detach()) == 0.0
    (sums.focal + sums.focal_aux + sums.caption + sums.l1 + sums.giou).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing, missing


def test_captions_attend_to_their_sample_memory_around_the_object():
    head = _head()
    out = head(*_inputs())
    rows, queries = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 4])
    context = out.caption_context(rows, queries)
    assert context.memory.shape[:2] == (3, 11) and torch.equal(context.centre, out.boxes[-1][rows, queries, :2])
    tokens = torch.tensor([[7, 8, 3], [9, 3, 3], [10, 3, 3]])
    states = out.states[-1][rows, queries]
    with_memory = head.caption_logits(states, tokens, context)
    assert not torch.allclose(with_memory, head.caption_logits(states, tokens))
    # padded memory slots are never read
    context.memory[1, 4 + 5:] = 1e3  # sample 1's padded language tokens (vision 4, language 5 of 7 real)
    assert torch.allclose(head.caption_logits(states, tokens, context), with_memory, atol=1e-5)

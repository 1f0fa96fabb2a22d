"""`arctic_varlen`: packed batches attend per sample with no mask built; everything else is exactly sdpa."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from arctic_vl.models.attention import (
    VARLEN_ATTENTION,
    language_model_of,
    segment_bounds,
    varlen_attention_forward,
    varlen_mask,
)
from arctic_vl.models.families import FAMILIES


class _Attn(torch.nn.Module):
    """What an attention function reads off its module: causality and the GQA group count."""

    def __init__(self, groups: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups = True, groups


def _block_causal(lengths: list[list[int]], length: int) -> torch.Tensor:
    """The (B, 1, T, T) boolean block-diagonal causal mask of rows of segments (what sdpa gets without us)."""
    masks = []
    for row in lengths:
        ids = torch.cat([torch.full((n,), k) for k, n in enumerate(row)])
        masks.append((ids[:, None] == ids[None, :]) & torch.ones(length, length, dtype=torch.bool).tril())
    return torch.stack(masks)[:, None]


@pytest.mark.parametrize("groups", [1, 2])
def test_segments_equal_the_block_diagonal_mask_forward_and_backward(groups):
    g = torch.Generator().manual_seed(0)
    rows = [[5, 9, 1, 3], [7, 11]]  # two rows of 18 tokens; the 1-token segment is a padding tail
    batch, heads, length, dim = 2, 4, 18, 8
    q = torch.randn(batch, heads, length, dim, generator=g, requires_grad=True)
    k = torch.randn(batch, heads // groups, length, dim, generator=g, requires_grad=True)
    v = torch.randn(batch, heads // groups, length, dim, generator=g, requires_grad=True)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    ends = torch.tensor([0] + [r * length + e for r, row in enumerate(rows)
                               for e in torch.tensor(row).cumsum(0).tolist()], dtype=torch.int32)
    module = _Attn(groups)

    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         attn_mask=_block_causal(rows, length)).transpose(1, 2)
    from_positions, _ = varlen_attention_forward(module, q, k, v, None, position_ids=positions)
    from_cu, _ = varlen_attention_forward(module, q, k, v, None, cu_seq_lens_q=ends, cu_seq_lens_k=ends,
                                          max_length_q=11, max_length_k=11)
    assert from_positions.shape == (batch, length, heads, dim)
    assert torch.allclose(from_positions, ref, atol=1e-6) and torch.allclose(from_cu, ref, atol=1e-6)

    grads = []
    for out in (ref, from_positions):
        q.grad = k.grad = v.grad = None
        (out * torch.linspace(-1, 1, dim)).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_segment_bounds_and_bad_cu_seq_lens():
    assert segment_bounds(torch.arange(6)[None].expand(2, -1), 2) is None  # one sequence a row: not packed
    assert segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]), 1) == [(0, 3), (3, 5), (5, 6)]
    # rows start segments of their own; a 1-D (1, T) position row is broadcast over the batch
    assert segment_bounds(torch.tensor([[0, 1, 0, 1]]), 2) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert segment_bounds(torch.zeros(3, 1, 4, dtype=torch.long), 1) is None  # mRoPE (3, B, T): not text positions
    q = torch.zeros(2, 1, 4, 8)
    cross = torch.tensor([0, 2, 6, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="crosses from one row"):
        varlen_attention_forward(_Attn(1), q, q, q, None, cu_seq_lens_q=cross, cu_seq_lens_k=cross)
    short = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="must rise from 0 to the 2 x 4 tokens"):
        varlen_attention_forward(_Attn(1), q, q, q, None, cu_seq_lens_q=short, cu_seq_lens_k=short)


def test_mask_is_skipped_only_where_the_attention_isolates_segments():
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

    common = {"batch_size": 1, "q_length": 5, "kv_length": 5, "mask_function": causal_mask_function,
              "allow_is_causal_skip": False}
    assert varlen_mask(**common) is None  # packed (no padding mask): the segments do the masking
    padding = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    rule = and_masks(causal_mask_function, lambda b, h, q, kv: kv != 1)  # a model's own pattern
    for extra in ({"attention_mask": padding}, {"mask_function": rule, "use_vmap": True}, {"local_size": 2},
                  {"kv_length": 7}):
        args = {**common, **extra}
        got, want = varlen_mask(**args), sdpa_mask(**args)
        assert got is not None and torch.equal(got, want), extra


@pytest.fixture
def models(tiny_dirs: dict[str, Path]) -> dict[str, Path]:
    return tiny_dirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_the_language_model_switches(family, models):
    from arctic_vl.models.loading import load_model

    model = load_model(models[family])
    lm = language_model_of(model)
    assert lm.config._attn_implementation == VARLEN_ATTENTION
    others = {m.config._attn_implementation for m in model.modules()
              if hasattr(m, "config") and not any(m is x for x in lm.modules()) and m is not model}
    assert others == {"sdpa"}, others  # the vision tower (and its sub-models) keep sdpa
    eager = language_model_of(load_model(models[family], attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"
    saved = model.config.to_dict()
    assert VARLEN_ATTENTION not in str(saved)  # never written into an exported config.json


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the mask every language-model attention call receives."""
    from transformers import AttentionInterface

    seen: list[Any] = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN_ATTENTION, spy)
    return seen


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_packed_training_step_equals_the_dense_mask_path(family, models, synthetic_data, monkeypatch):
    """Same hidden states and same gradients as sdpa with transformers' block-diagonal mask; no mask is built."""
    from arctic_vl import final_hidden, lm_loss_sum
    from arctic_vl.data.factory import VLMDataConfig, VLMDataFactory
    from arctic_vl.models.base import ModelBundle
    from arctic_vl.models.loading import family_of_dir, load_model, load_processor

    path = models[family]
    varlen, dense = load_model(path), load_model(path)
    language_model_of(dense).set_attn_implementation("sdpa")
    bundle = ModelBundle(varlen, load_processor(path), family_of_dir(path))
    cfg = VLMDataConfig(sources=[{"path": str(synthetic_data / "train.llava.json"), "sample": "first:8"}],
                        max_length=400, packing=True, micro_batch_size=2)
    data = VLMDataFactory(cfg).build(bundle, seed=0)
    batch = data.collate([data.train[(r, i)] for r, row in enumerate([[0, 1, 2], [3, 4]]) for i in row])
    seen = _spy(monkeypatch)
    results = []
    for model in (varlen, dense):
        model.train()
        hidden, head, _ = final_hidden(model, batch)
        loss, _ = lm_loss_sum(hidden, head, batch["labels"])
        loss.backward()
        results.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    layers = language_model_of(varlen).config.num_hidden_layers
    assert len(seen) == layers and all(m is None for m in seen)  # only the varlen model went through the spy
    (h1, g1), (h2, g2) = results
    real = batch["labels"] != -100
    assert torch.allclose(h1[real], h2[real], atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 10
    worst = max(float((g1[n] - g2[n]).abs().max()) for n in g1)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_are_plain_sdpa(side, models):
    """Ordinary (padded) batches give bit-for-bit sdpa's outputs: left padding (generation) included."""
    from arctic_vl.models.loading import load_model

    varlen, plain = load_model(models["llava_next"]).eval(), load_model(models["llava_next"]).eval()
    language_model_of(plain).set_attn_implementation("sdpa")
    ids = torch.randint(20, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row, n in enumerate((12, 7, 4)):
        if side == "right":
            mask[row, n:] = 0
        else:
            mask[row, :12 - n] = 0
    with torch.no_grad():
        a = varlen(input_ids=ids, attention_mask=mask).logits
        b = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a[mask.bool()], b[mask.bool()])

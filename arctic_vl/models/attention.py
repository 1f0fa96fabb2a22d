"""Variable-length attention for packed batches: each packed sample attends to itself only, no dense mask.

A packed row holds several samples back to back, each with text positions restarting at 0 (`collate_packed`).
With plain sdpa, transformers turns those restarts into a dense block-diagonal (B, 1, T, T) mask and sdpa then
computes the whole T x T score matrix of the row to throw most of it away: the cost grows with the square of
the ROW length (a 1024-token row of ten 100-token samples pays 10x the attention it needs). `arctic_varlen`
computes attention segment by segment instead, so the cost grows with the squares of the SAMPLE lengths:

* segments come from `cu_seq_lens_q/k` + `max_length_q/k` when a caller passes them (transformers'
  `FlashAttentionKwargs`, cumulative lengths over the flattened (B x T) tokens), otherwise from the restarts
  of the 2-D `position_ids` every decoder layer hands its attention (what transformers' own flash path does
  in `prepare_fa_kwargs_from_position_ids`). The packed batch itself needs nothing more than its positions:
  we do not put `cu_seq_lens` into the batch, because the Qwen-VL composites forward their keyword arguments
  into the vision tower too, whose flash attention passes its own `cu_seq_lens_q` (a collision) and whose
  patches are no packed text.
* on CUDA with `flash_attn` importable and half-precision inputs: `flash_attn_varlen_func` over the flattened
  tokens; otherwise one causal `scaled_dot_product_attention` per segment (the row's padding tail is a
  segment of its own, it trains nothing).
* anything else is sdpa, unchanged: a batch with a padding mask, a model that asks for its own dense mask
  (an `and_mask_function` / `or_mask_function` such as alternating_attn's modality rule, a sliding window,
  bidirectional attention), a KV cache, an unpacked batch.

Only the language model is switched (`use_varlen_attention`, called by `load_model` for sdpa): vision towers
keep their own implementation. The implementation name is never saved (transformers does not serialize
`_attn_implementation`), so an exported model loads anywhere. Works with transformers 5.17 (the GPU image) and
5.23: both call the mask interface with the same keywords and pass `position_ids` down to the attention.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from typing import Any

import torch

#: the name registered with transformers' AttentionInterface and AttentionMaskInterface
VARLEN_ATTENTION = "arctic_varlen"


@functools.cache
def _flash_varlen() -> Any:
    """`flash_attn.flash_attn_varlen_func` when flash-attn imports (a CUDA machine), else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def segment_bounds(position_ids: torch.Tensor, batch_size: int) -> list[tuple[int, int]] | None:
    """[start, end) of each packed segment over the flattened (B x T) tokens, from 2-D text positions; None when
    every row is one sequence (nothing is packed).

    A segment starts where a row starts or where the position does not continue the previous one by 1 (the
    rule of transformers' `find_packed_sequence_indices`).
    """
    if position_ids.dim() != 2:
        return None
    if position_ids.shape[0] != batch_size:
        position_ids = position_ids.expand(batch_size, -1)
    length = position_ids.shape[1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    flat = starts.reshape(-1).nonzero().view(-1).tolist()
    if len(flat) == batch_size:
        return None
    return list(itertools.pairwise([*flat, batch_size * length]))


def _bounds_from_cu(cu_seq_lens: torch.Tensor, batch_size: int, length: int) -> list[tuple[int, int]]:
    cu = [int(c) for c in cu_seq_lens.tolist()]
    if cu[0] != 0 or cu[-1] != batch_size * length or any(b < a for a, b in itertools.pairwise(cu)):
        raise ValueError(f"cu_seq_lens {cu[:8]}... must rise from 0 to the {batch_size} x {length} tokens of the batch")
    bounds = [(a, b) for a, b in itertools.pairwise(cu) if b > a]
    if any(a // length != (b - 1) // length for a, b in bounds):
        raise ValueError("a packed segment in cu_seq_lens crosses from one row of the batch into the next")
    return bounds


def _segment_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  bounds: list[tuple[int, int]], dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal sdpa per segment; (B, H, T, D) in, (B, T, H, D) out (the layout attention functions return)."""
    batch, _, length, _ = query.shape
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    rows: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for start, end in bounds:
        b, s, e = start // length, start % length, (end - 1) % length + 1
        rows[b].append(torch.nn.functional.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], dropout_p=dropout,
            is_causal=True, scale=scaling, enable_gqa=gqa))
    out = torch.cat([torch.cat(parts, dim=2) for parts in rows], dim=0)
    return out.transpose(1, 2).contiguous()


def _flash_segments(fn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    bounds: list[tuple[int, int]], dropout: float, scaling: float | None) -> torch.Tensor:
    """flash_attn_varlen_func over the flattened tokens; (B, H, T, D) in, (B, T, H, D) out."""
    batch, _, length, _ = query.shape
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[3]) for x in (query, key, value))
    cu = torch.tensor([0] + [e for _, e in bounds], dtype=torch.int32, device=query.device)
    longest = max(e - s for s, e in bounds)
    out = fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
             dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.reshape(batch, length, *out.shape[1:])


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: per-segment causal attention for packed batches, sdpa for the rest."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # A mask (padding, or a model's own dense pattern) or a cache (q and k lengths differ) is sdpa's business.
    maybe_packed = (attention_mask is None and causal and query.shape[2] == key.shape[2] > 1
                    and (kwargs.get("cu_seq_lens_q") is not None
                         or isinstance(kwargs.get("position_ids"), torch.Tensor)))
    if maybe_packed:
        return _packed_attention(module, query, key, value, dropout, scaling, is_causal, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@torch.compiler.disable
def _packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      dropout: float, scaling: float | None, is_causal: bool | None,
                      kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """Segments from cu_seq_lens or the position restarts, then flash varlen or sdpa per segment.

    Kept out of torch.compile graphs (`trainer.compile`): the segments are host-side lists that change every
    batch; tracing them would recompile each step. The layers around it stay compiled.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, length = query.shape[0], query.shape[2]
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        if not torch.equal(kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]):
            raise ValueError("arctic_varlen attention needs cu_seq_lens_q == cu_seq_lens_k (self-attention)")
        bounds = _bounds_from_cu(kwargs["cu_seq_lens_q"], batch, length)
    else:
        bounds = segment_bounds(kwargs["position_ids"], batch)
    if bounds is None:  # one sequence a row: plain causal sdpa
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    flash = _flash_varlen()
    if flash is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return _flash_segments(flash, query, key, value, bounds, dropout, scaling), None
    return _segment_sdpa(module, query, key, value, bounds, dropout, scaling), None


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, use_vmap: bool = False,
                local_size: int | None = None, **kwargs: Any) -> torch.Tensor | None:
    """An AttentionMaskInterface function: no mask where the attention isolates packed segments itself (plain
    causal, no padding, no cache), otherwise exactly sdpa's mask (padding, a model's own mask functions, a
    sliding window, bidirectional attention, a cache)."""
    from transformers.masking_utils import sdpa_mask

    plain = (attention_mask is None and not use_vmap and local_size is None and not kwargs.get("chunk_size")
             and "allow_is_bidirectional_skip" not in kwargs and not kwargs.get("q_offset")
             and not kwargs.get("kv_offset") and kwargs.get("q_length") == kwargs.get("kv_length"))
    if plain:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, use_vmap=use_vmap, local_size=local_size, **kwargs)


@functools.cache
def register() -> None:
    """Register `arctic_varlen` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, varlen_mask)


def language_model_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The language model (decoder stack) of a loaded VLM, inside any PEFT wrapper; None if it has none."""
    from arctic_vl.models.forward import unwrap_peft

    hf = unwrap_peft(model)
    backbone = getattr(hf, "model", hf)
    lm = getattr(backbone, "language_model", None)
    return lm if isinstance(lm, torch.nn.Module) else None


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch a VLM's language model from sdpa to `arctic_varlen`; the vision tower keeps its own.

    Returns whether the language model now uses it (False for eager / flash_attention_2 / a model without a
    `language_model`: those keep what they were loaded with).
    """
    lm = language_model_of(model)
    if lm is None or getattr(lm.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    lm.set_attn_implementation(VARLEN_ATTENTION)
    return lm.config._attn_implementation == VARLEN_ATTENTION

"""Collate: dataset items -> the batch a trainer's `loss` receives (the contract in `arctic_vl.batch`).

`pad_collate` right-pads samples (one per row); `pack_collate` concatenates each row's samples padding-free
with per-sample positions. `Collator` and `PackedCollator` are the `DataBundle.collate` callables: they
add the loop's bookkeeping keys (`_indices`, `_num_samples`, `_num_tokens`, and for packing `_num_slots`).
Items carry their dataset index as `ITEM_INDEX` (and a packing plan's row as `ITEM_ROW`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from arctic_vl.batch import DROPPED, INDICES, NUM_SAMPLES, NUM_SLOTS, NUM_TOKENS
from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.data.encoding import TEXT_KEYS, SampleEncoder
from arctic_vl.data.sampling import PADDING_INDEX

#: the key of an item's dataset index (-1: a padding sample), set by the dataset, popped by the collators
ITEM_INDEX = "_index"
#: the key of an item's row within a packed micro-batch (packing plans only)
ITEM_ROW = "_row"
#: the key of an item that turned out bad when loaded (pixels that do not decode): (source, index, reason,
#: message). The collators drop such items from the batch and list them under the batch's `_dropped`.
ITEM_BAD = "_bad"
#: per-sample mRoPE: (input_ids (1, L), mm_token_type_ids (1, L), image_grid_thw (images, 3)) -> (3, 1, L)
RopeIndexFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pad_collate(encoder: SampleEncoder, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad text, merge vision tensors in the family's layout, add attention_mask (and mm_token_type_ids)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), length), encoder.pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if encoder.family.is_qwen:
        # transformers 5 builds Qwen's mRoPE positions from it; the processor returns it too.
        batch["mm_token_type_ids"] = (input_ids == encoder.image_token_id).long()
    batch.update(merge_vision(samples))
    return batch


def pack_collate(encoder: SampleEncoder, rows: list[list[dict]],
                 rope_index: RopeIndexFn | None = None) -> dict[str, torch.Tensor]:
    """Pack each row's samples into one sequence, padding-free within a row; rows are right-padded.

    Each sample keeps its own positions: 1-D positions restart at 0 per sample and, for the Qwen
    families, the 3-D mRoPE positions come from `rope_index` run on that sample ALONE (positions of
    the whole concatenation would be wrong: every image after the first would be placed relative to
    the other samples' tokens). The batch carries `position_ids` and NO `attention_mask`: from the
    restarts in the (text) positions transformers builds a block-diagonal causal mask for sdpa/eager
    and variable-length attention for flash_attention_2, so samples never see each other. Qwen
    position_ids are (4, rows, T): row 0 the per-sample text positions (what the mask is built
    from), rows 1-3 mRoPE t/h/w, the layout transformers 5 reads for packed Qwen-VL inputs.

    The first label of every sample is -100: with the causal shift it would be predicted from the
    previous sample's last token. (Alone, a sample's first label is never used either, so per-sample
    losses are unchanged.) Row padding is a segment of its own (positions from 0, labels -100).
    """
    if not rows or not all(rows):
        raise ValueError("pack_collate needs at least one row and no empty row")
    qwen = encoder.family.is_qwen
    if qwen and rope_index is None:
        raise ValueError(f"packing {encoder.family.name} needs the model's get_rope_index (per-sample mRoPE)")
    lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    length = max(lengths)
    shape = (len(rows), length)
    input_ids = torch.full(shape, encoder.pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    text_pos = torch.zeros(shape, dtype=torch.long)
    mrope = torch.zeros((3, *shape), dtype=torch.long) if qwen else None
    for r, row in enumerate(rows):
        at = 0
        for sample in row:
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[r, at:at + n] = ids
            labels[r, at + 1:at + n] = torch.as_tensor(sample["labels"], dtype=torch.long)[1:]
            text_pos[r, at:at + n] = torch.arange(n)
            if mrope is not None:
                mrope[:, r, at:at + n] = _sample_mrope(encoder, ids, sample, rope_index)
            at += n
        # Row padding restarts its positions too, so it forms its own block in the mask.
        text_pos[r, at:] = torch.arange(length - at)
        if mrope is not None:
            mrope[:, r, at:] = torch.arange(length - at)
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}
    if mrope is not None:
        batch["position_ids"] = torch.cat([text_pos[None], mrope], dim=0)
        batch["mm_token_type_ids"] = (input_ids == encoder.image_token_id).long()
    else:
        batch["position_ids"] = text_pos
    # Vision tensors in row-major sample order: the order of the image tokens in the batch.
    batch.update(merge_vision([s for row in rows for s in row]))
    return batch


def _sample_mrope(encoder: SampleEncoder, ids: torch.Tensor, sample: dict,
                  rope_index: RopeIndexFn | None) -> torch.Tensor:
    """(3, L) mRoPE positions of one sample on its own: what the model computes for it unpacked."""
    if "image_grid_thw" not in sample:
        # Text only: the model's own positions for such a sample are 0..L-1 on all three axes.
        return torch.arange(len(ids)).expand(3, -1)
    assert rope_index is not None  # checked by pack_collate
    types = (ids == encoder.image_token_id).long()
    positions = rope_index(ids[None], types[None], sample["image_grid_thw"])
    return positions[:, 0].to(torch.long)


def padding_sample(encoder: SampleEncoder) -> dict[str, Any]:
    """A sample that trains nothing and needs no image: one pad token, no label (what a rank gets for a padding
    index, or for a micro-batch whose samples were all dropped, so every rank still runs its forward)."""
    return {"input_ids": torch.tensor([encoder.pad_token_id], dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX], dtype=torch.long), ITEM_INDEX: PADDING_INDEX}


def drop_bad(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, int, str, str]]]:
    """The samples that loaded, and what the bad ones carry under `ITEM_BAD` (dropped, in batch order)."""
    good = [s for s in samples if ITEM_BAD not in s]
    return good, [s[ITEM_BAD] for s in samples if ITEM_BAD in s]


def merge_vision(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The vision tensors of `samples` (those with images), merged in sample order."""
    vision = [s for s in samples if "pixel_values" in s]
    if not vision:
        return {}
    # Only tensors: callers may carry their own bookkeeping keys (e.g. "_index") through.
    keys = [k for k, v in vision[0].items()
            if k not in TEXT_KEYS and not k.startswith("_") and isinstance(v, torch.Tensor)]
    return {key: _merge(key, [s[key] for s in vision]) for key in keys}


def _merge(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample vision tensors; LLaVA's (images, tiles, C, H, W) pads the tile axis."""
    if key == "pixel_values" and tensors[0].dim() == 5:
        tiles = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, tiles - t.shape[1])) for t in tensors]
    return torch.cat(tensors, dim=0)


def _bookkeeping(batch: dict[str, Any], samples: list[dict[str, Any]], indices: list[int]) -> dict[str, Any]:
    """The loop's keys: sample indices, real samples, real tokens of real samples."""
    real = [i != PADDING_INDEX for i in indices]
    batch[INDICES] = indices
    batch[NUM_SAMPLES] = sum(real)
    batch[NUM_TOKENS] = int(sum(len(s["input_ids"]) for s, r in zip(samples, real) if r))
    return batch


class Collator:
    """`DataBundle.collate` without packing: `pad_collate` plus the loop's bookkeeping keys.

    `Collator(encoder)(samples)`: each sample is a dict with `input_ids` and `labels` (1-D), the vision tensors
    of `encoder.encode_images` (if it has images) and `_index` (its dataset index); returns a `Batch` with
    `_indices`, `_num_samples` and `_num_tokens` set. Samples marked bad as they loaded are dropped and named
    in the batch for `DataBundle.accept`. Data factories that build items their own way reuse it, so the batch
    contract has one owner.
    """

    def __init__(self, encoder: SampleEncoder):
        self.encoder = encoder

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate a micro-batch: bad samples dropped (counted under DROPPED), padded, bookkeeping keys added."""
        samples, dropped = drop_bad(samples)
        samples = samples or [padding_sample(self.encoder)]
        indices = [s.pop(ITEM_INDEX) for s in samples]
        batch = _bookkeeping(pad_collate(self.encoder, samples), samples, indices)
        if dropped:
            batch[DROPPED] = dropped
        return batch


class RopeIndex:
    """A model's own `get_rope_index` on one sample: (ids (1, L), types (1, L), grid_thw) -> (3, 1, L).

    Holds the backbone's bound method; it reads only the config (no parameters), so it runs in
    DataLoader workers (forked) on CPU tensors while the model itself lives on the accelerator.
    """

    def __init__(self, model: torch.nn.Module):
        from arctic_vl.models.forward import unwrap_peft

        hf = unwrap_peft(model)
        backbone = getattr(hf, "model", hf)
        fn = getattr(backbone, "get_rope_index", None)
        if fn is None:
            raise TypeError(f"{type(backbone).__name__} has no get_rope_index; it is not a Qwen-VL model")
        self._fn = fn
        # Older transformers (the GPU image has 5.17) may take no mm_token_type_ids.
        self._takes_types = "mm_token_type_ids" in inspect.signature(fn).parameters

    def __call__(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                 image_grid_thw: torch.Tensor) -> torch.Tensor:
        """3D (mRoPE) position ids (3, 1, L) of one sample, computed without grad."""
        kwargs: dict[str, Any] = {"image_grid_thw": image_grid_thw}
        if self._takes_types:
            kwargs["mm_token_type_ids"] = mm_token_type_ids
        with torch.no_grad():
            positions, _ = self._fn(input_ids, **kwargs)
        return positions


class PackedCollator:
    """`DataBundle.collate` with packing: a micro-batch of items tagged `ITEM_ROW` by the dataset, packed
    by `pack_collate`, plus the bookkeeping keys and `_num_slots` (rows x max_length, for the per-step
    efficiency).

    Items without a row (evaluation batches, built sample by sample) go to `fallback`, the ordinary
    padding collator.

    `single_row`: put all rows of the micro-batch into ONE row, with no padding at all. Needed for
    flash attention: transformers runs it variable-length (samples isolated) only for a batch of one
    row; with more rows it would attend across the samples of a row. Its cost is per sample anyway.
    """

    def __init__(self, encoder: SampleEncoder, max_length: int, fallback: Any, rope_index: RopeIndex | None = None,
                 single_row: bool = False):
        self.encoder = encoder
        self.max_length = max_length
        self.fallback = fallback
        self.rope_index = rope_index
        self.single_row = single_row

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pack a micro-batch by its ITEM_ROW tags (one row if `single_row`); an untagged one goes to `fallback`."""
        if not any(ITEM_ROW in s for s in samples):
            return self.fallback(samples)
        n_rows = len({s.get(ITEM_ROW, 0) for s in samples})  # as planned, before any sample is dropped
        samples, dropped = drop_bad(samples)
        samples = samples or [{**padding_sample(self.encoder), ITEM_ROW: 0}]
        rows: dict[int, list[dict[str, Any]]] = {}
        indices = []
        for s in samples:
            indices.append(s.pop(ITEM_INDEX))
            rows.setdefault(s.pop(ITEM_ROW, 0), []).append(s)
        grouped = [rows[r] for r in sorted(rows)]
        if self.single_row:
            grouped = [[s for row in grouped for s in row]]
        batch = _bookkeeping(pack_collate(self.encoder, grouped, self.rope_index), samples, indices)
        batch[NUM_SLOTS] = n_rows * self.max_length
        if dropped:
            batch[DROPPED] = dropped
        return batch

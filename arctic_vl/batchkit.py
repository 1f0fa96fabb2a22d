"""The batch toolkit: helpers a trainer, evaluator or project applies to items and batches (see `arctic_vl.batch`).

`prompt_item` cuts an item at its answer (for generation); `slice_rows` takes rows of a collated batch with their
images; `render_tokens` shows tokens with the trained parts in `[[...]]`. Labels use `IGNORE_INDEX` (-100) for
positions that train nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from arctic_vl.batch import DROPPED
from arctic_vl.constants import IGNORE_INDEX

#: per-image fields of a batch (images of all rows, in row order); `batch_num_images` is per row
_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")


def answer_start(labels: Any, *, last: bool = False) -> int | None:
    """Index of the first trained label (`last`: the first of the last trained run); None when none is trained."""
    values = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    trained = [i for i, v in enumerate(values) if v != IGNORE_INDEX]
    if not trained:
        return None
    if not last:
        return trained[0]
    start = trained[-1]
    while start > 0 and values[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def prompt_item(item: dict[str, Any], *, last: bool = False, start: int | None = None) -> dict[str, Any]:
    """A copy of `item` cut before its answer, for generation: `input_ids` up to the first trained label (`last`:
    the start of the last trained run, the answer to the last question; `start`: cut there), `labels` as long,
    all `IGNORE_INDEX`; every other field (images, bookkeeping) kept. ValueError when no label is trained."""
    if start is None:
        start = answer_start(item["labels"], last=last)
    if start is None:
        raise ValueError("prompt_item: the item has no trained label (no answer to cut at)")
    ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
    return {**item, "input_ids": ids[:start].clone(),
            "labels": torch.full((start,), IGNORE_INDEX, dtype=torch.long, device=ids.device)}


def _row_image_counts(batch: dict[str, Any], image_token_id: int | None, merge_size: int) -> list[int]:
    """Images of each row: Qwen by walking the image tokens (image k has t*h*w / merge^2 of them), LLaVA from
    `batch_num_images`, one per row when there are as many images as rows, else rows with an image token."""
    ids = batch["input_ids"]
    rows = ids.shape[0]
    grid = batch.get("image_grid_thw")
    if grid is not None:
        if image_token_id is None:
            raise ValueError("slice_rows: a batch with image_grid_thw needs image_token_id")
        tokens = [int(p) // merge_size**2 for p in grid.prod(-1).tolist()]
        counts, k = [], 0
        for r in range(rows):
            mine, n = int((ids[r] == image_token_id).sum()), 0
            while mine > 0:
                mine -= tokens[k]
                k, n = k + 1, n + 1
            counts.append(n)
        return counts
    if "batch_num_images" in batch:
        return [int(n) for n in batch["batch_num_images"].tolist()]
    if batch["pixel_values"].shape[0] == rows:
        return [1] * rows
    if image_token_id is not None:
        return [int((ids[r] == image_token_id).any()) for r in range(rows)]
    raise ValueError("slice_rows: cannot tell which images belong to which row (give image_token_id)")


def slice_rows(batch: dict[str, Any], rows: Sequence[int], *, image_token_id: int | None = None,
               merge_size: int = 2) -> dict[str, Any]:
    """The batch of `rows` (in that order), every row-aligned field indexed: tensors of dim 0 = B (`position_ids`
    of shape (4, B, T): dim 1), lists of B entries (`_indices`, a project's per-row lists), and the images of those
    rows (Qwen `pixel_values` patches and `image_grid_thw`, LLaVA `pixel_values` and `image_sizes`). Scalar
    bookkeeping (`_num_samples`, `_num_tokens`, ...) and `_dropped` describe the whole batch and are left out.
    Qwen batches need `image_token_id` (and the processor's `merge_size`) to tell each row's images."""
    rows = [int(r) for r in rows]
    ids = batch["input_ids"]
    n_rows = ids.shape[0]
    index = torch.tensor(rows, dtype=torch.long, device=ids.device)
    out: dict[str, Any] = {}
    if "pixel_values" in batch:
        counts = _row_image_counts(batch, image_token_id, merge_size)
        firsts = [sum(counts[:r]) for r in range(n_rows)]
        images = [k for r in rows for k in range(firsts[r], firsts[r] + counts[r])]
        grid = batch.get("image_grid_thw")
        if grid is not None:  # Qwen: pixel_values are patches, t*h*w per image
            patches = [int(p) for p in grid.prod(-1).tolist()]
            starts = [sum(patches[:k]) for k in range(len(patches))]
            parts = [batch["pixel_values"][starts[k]:starts[k] + patches[k]] for k in images]
            out["pixel_values"] = torch.cat(parts) if parts else batch["pixel_values"][:0]
            out["image_grid_thw"] = grid[images]
        else:
            out["pixel_values"] = batch["pixel_values"][images]
            if "image_sizes" in batch:
                out["image_sizes"] = batch["image_sizes"][images]
    for key, value in batch.items():
        if key in _IMAGE_KEYS:
            continue
        if isinstance(value, torch.Tensor):
            if key == "position_ids" and value.dim() == 3:
                out[key] = value[:, index]
            elif value.dim() > 0 and value.shape[0] == n_rows:
                out[key] = value[index]
        elif isinstance(value, list) and len(value) == n_rows and key != DROPPED:
            out[key] = [value[r] for r in rows]
    return out


def render_tokens(tokenizer: Any, input_ids: list[int], labels: list[int], image_token_ids: set[int]) -> str:
    """Tokens as text; trained (labelled) runs wrapped in [[...]], each image's run shown as <image x N>."""
    out, i = [], 0
    while i < len(input_ids):
        tid = input_ids[i]
        if tid in image_token_ids:
            j = i
            while j < len(input_ids) and input_ids[j] == tid:
                j += 1
            out.append(f"<{tokenizer.convert_ids_to_tokens(tid)} x {j - i}>")
            i = j
            continue
        trained = labels[i] != IGNORE_INDEX
        j = i
        while j < len(input_ids) and (labels[j] != IGNORE_INDEX) == trained and input_ids[j] not in image_token_ids:
            j += 1
        text = tokenizer.decode(input_ids[i:j], skip_special_tokens=False)
        out.append(f"[[{text}]]" if trained else text)
        i = j
    return "".join(out)

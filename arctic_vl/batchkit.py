"""The batch toolkit: helpers a trainer, evaluator or project applies to items and batches (see `arctic_vl.batch`).

`prompt_item` cuts an item at its answer (for generation); `render_tokens` shows tokens with the trained parts
in `[[...]]`. Labels use `IGNORE_INDEX` (-100) for positions that train nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from arctic_vl.constants import IGNORE_INDEX


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

"""One forward of the pair: the VLM backbone (no logits), then the head on its hidden states and image embeddings.

The image embeddings are what the VLM's merger feeds the LLM: a forward pre-hook on the language model reads
them from its `inputs_embeds` at the image tokens, so the vision tower runs once and the detection loss reaches
it through the same graph as the LM loss. The head sees the student (last) image of each sample and the text
BEFORE the student answer: the answer is never fed to the detector, so training and `predict` (which has no
answer) read the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from arctic_vl import final_hidden, unwrap_peft

from .head import DetectionOutput
from .spans import STUDENT


@dataclass
class PairOutput:
    """The backbone's final hidden states and output layer (for the LM loss) and the head's output."""

    hidden: torch.Tensor
    lm_head: torch.nn.Module
    detection: DetectionOutput


def student_image_tokens(input_ids: torch.Tensor, image_token_id: int, grid_thw: torch.Tensor | None,
                         merge: int) -> list[tuple[int, int, int, int] | None]:
    """Per row: (start, end, grid_h, grid_w) of its LAST image's tokens in merged-grid units, or None (no image).

    Images are numbered in row order (the order of `image_grid_thw`); each image's tokens are one run.
    """
    out: list[tuple[int, int, int, int] | None] = []
    seen = 0
    for row in input_ids.tolist():
        runs, start = [], None
        for i, tok in enumerate([*row, None]):
            if tok == image_token_id and start is None:
                start = i
            elif tok != image_token_id and start is not None:
                runs.append((start, i))
                start = None
        if not runs:
            out.append(None)
            continue
        seen += len(runs)
        if grid_thw is None or seen > grid_thw.shape[0]:
            raise ValueError("image tokens without a matching image_grid_thw row")
        t, h, w = (int(v) for v in grid_thw[seen - 1])
        start, end = runs[-1]
        gh, gw = h // merge, w // merge
        if end - start != t * gh * gw:
            raise ValueError(f"the last image has {end - start} tokens but its grid {t}x{h}x{w} gives {t * gh * gw}")
        out.append((start, end, gh, gw))
    return out


def student_vision(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                   grid_thw: torch.Tensor | None, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student image's embeddings (B, V, D), mask (B, V) and normalised token centres (B, V, 2) (x, y)."""
    spans = student_image_tokens(input_ids, image_token_id, grid_thw, merge)
    v = max((s[1] - s[0] for s in spans if s is not None), default=0) or 1
    b, _, d = embeds.shape
    vision = embeds.new_zeros((b, v, d))
    mask = torch.zeros((b, v), dtype=torch.bool, device=embeds.device)
    xy = torch.zeros((b, v, 2), dtype=torch.float32, device=embeds.device)
    for row, s in enumerate(spans):
        if s is None:
            continue
        start, end, gh, gw = s
        n = end - start
        vision[row, :n] = embeds[row, start:end]
        mask[row, :n] = True
        k = torch.arange(n, device=embeds.device)
        xy[row, :n, 0] = ((k % gw).float() + 0.5) / gw
        xy[row, :n, 1] = (((k // gw) % gh).float() + 0.5) / gh
    return vision, mask, xy


def memory_text_mask(batch: dict[str, Any]) -> torch.Tensor:
    """(B, T) True at the real tokens before the student answer (all real tokens when a row has none)."""
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(ids, dtype=torch.bool)
    spans = batch.get("_spans")
    if spans is None:
        return real
    student = spans == STUDENT
    has = student.any(1)
    first = torch.where(has, student.float().argmax(1), torch.full_like(has, ids.shape[1], dtype=torch.long))
    before = torch.arange(ids.shape[1], device=ids.device)[None] < first[:, None]
    return real & before


def pair_forward(model: torch.nn.Module, batch: dict[str, Any], image_token_id: int) -> PairOutput:
    """Backbone + head on one batch. `model` is a `DetectionVLM` (`vlm`, `detection_head`)."""
    vlm, head = model.vlm, model.detection_head
    backbone = unwrap_peft(vlm).model
    captured: dict[str, torch.Tensor] = {}

    def capture(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs.get("inputs_embeds") is not None:
            captured["embeds"] = kwargs["inputs_embeds"]

    handle = backbone.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        hidden, lm_head, _ = final_hidden(vlm, batch)
    finally:
        handle.remove()
    if "embeds" not in captured:
        raise RuntimeError(f"{type(backbone).__name__}: the language model was not called with inputs_embeds; "
                           "cannot read the image embeddings")
    merge = int(getattr(backbone.config.vision_config, "spatial_merge_size", 2))
    vision, vmask, vxy = student_vision(captured["embeds"], batch["input_ids"], image_token_id,
                                        batch.get("image_grid_thw"), merge)
    out = head(hidden, memory_text_mask(batch), vision, vmask, vxy)
    return PairOutput(hidden, lm_head, out)

"""Sample encoding: text once (knowing only image sizes), pixels lazily, and batch collation.

`SampleEncoder.encode_text` renders a conversation with the family's chat template, expands each
image placeholder to the token count the processor itself would produce for that image size, and
masks labels to the assistant turns (content + end-of-turn token). `encode_images` runs the
processor's image path on decoded pixels (in DataLoader workers), and `collate` merges samples into
the batch layout the family's model expects. The result equals what `processor(text, images)` gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.errors import ConfigError, DataError
from arctic_vl.models.families import FamilySpec

IMAGE_MARKER = "<image>"  # how a record marks an image's position in its text
ROLES = ("system", "user", "assistant")
# Keys of a processor output that belong to the text side; everything else is a vision tensor.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels"})
#: per-sample mRoPE: (input_ids (1, L), mm_token_type_ids (1, L), image_grid_thw (images, 3)) -> (3, 1, L)
RopeIndexFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EncodedText:
    """Token ids, labels (-100 where not trained) and [start, end) of each image's placeholder tokens."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)


def _apply_budget(processor: Any, family: FamilySpec, min_pixels: int | None, max_pixels: int | None,
                  image_grid_pinpoints: list[list[int]] | None) -> Any:
    """A shallow copy of `processor` whose own image processor carries the image budget.

    Both the token count (`_get_num_multimodal_tokens` reads the image processor's attributes) and
    the pixels come from this copy, so they always agree; the caller's processor is left untouched.
    """
    if (min_pixels is not None or max_pixels is not None) and not family.is_qwen:
        raise ConfigError(f"min_pixels/max_pixels apply to the Qwen families, not {family.name!r}; "
                          "use image_grid_pinpoints for LLaVA")
    if image_grid_pinpoints is not None and family.is_qwen:
        raise ConfigError(f"image_grid_pinpoints apply to the LLaVA families, not {family.name!r}; "
                          "use min_pixels/max_pixels for Qwen")
    if min_pixels is None and max_pixels is None and image_grid_pinpoints is None:
        return processor
    processor = copy.copy(processor)
    image_processor = copy.deepcopy(processor.image_processor)
    if image_grid_pinpoints is not None:
        image_processor.image_grid_pinpoints = [list(p) for p in image_grid_pinpoints]
    if min_pixels is not None or max_pixels is not None:
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        if size.get("shortest_edge", 0) > size.get("longest_edge", float("inf")):
            raise ConfigError(f"min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}")
        image_processor.size = size if isinstance(image_processor.size, dict) else type(image_processor.size)(**size)
        for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            # Older image processors keep the budget as attributes too.
            if value is not None and getattr(image_processor, key, None) is not None:
                setattr(image_processor, key, value)
    processor.image_processor = image_processor
    return processor


def _split_parts(content: str) -> list[dict[str, str]]:
    """`"<image>\\nWhat?"` -> [{type: image}, {type: text, text: "\\nWhat?"}] (HF's multimodal message format)."""
    parts: list[dict[str, str]] = []
    for i, chunk in enumerate(content.split(IMAGE_MARKER)):
        if i > 0:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


class SampleEncoder:
    """Tokenize conversations once, encode images lazily, collate batches for one VLM family."""

    def __init__(self, processor: Any, family: FamilySpec, *, min_pixels: int | None = None,
                 max_pixels: int | None = None, image_grid_pinpoints: list[list[int]] | None = None,
                 system_prompt: str | None = None):
        self.family = family
        self.processor = _apply_budget(processor, family, min_pixels, max_pixels, image_grid_pinpoints)
        self.tokenizer = processor.tokenizer
        self.system_prompt = system_prompt
        self.image_token: str = processor.image_token
        self.image_token_id: int = processor.image_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else self.tokenizer.eos_token_id
        # Strings that can end a turn: the tokenizer's special tokens minus the image/video ones.
        special = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        special |= set(self.tokenizer.all_special_tokens)
        media = {self.image_token, getattr(processor, "video_token", None), *family.special_tokens.values()}
        self._end_tokens = sorted(special - media, key=len, reverse=True)

    # ----------------------------------------------------------------------------------------- counts
    def image_token_count(self, width: int, height: int, *, images_in_sample: int = 1) -> int:
        """How many image tokens the processor expands one `width` x `height` image to.

        `images_in_sample` matters for LLaVA-OneVision, which encodes images of multi-image samples
        without anyres tiling.
        """
        if images_in_sample > 1 and self.family.name == "llava_onevision":
            # The processor's own multi-image rule (base tile + newline) lives in replace_image_token.
            text = self.processor.replace_image_token({"batch_num_images": [images_in_sample]}, image_idx=0)
            return text.count(self.image_token)
        data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
        return int(data.num_image_tokens[0])

    # ------------------------------------------------------------------------------------------- text
    def _check_messages(self, messages: list[dict], n_images: int) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise DataError("a sample needs a non-empty list of messages", reason="malformed_turns")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                raise DataError(
                    f"message {i} must be {{role: {'|'.join(ROLES)}, content: str}}, got {msg!r:.120}",
                    reason="malformed_turns",
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("a sample needs at least one assistant turn to train on", reason="malformed_turns")
        found = sum(m["content"].count(IMAGE_MARKER) for m in messages)
        if found != n_images:
            raise DataError(f"the text has {found} {IMAGE_MARKER} markers but the sample has {n_images} images",
                            reason="image_token_mismatch")
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def _render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        # The processor's template is the VLM one; the tokenizer's may be text-only.
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return owner.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _label_spans(self, messages: list[dict], conversation: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans of each assistant turn's content + end-of-turn token in `full`."""
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prefix = self._render(conversation[:i], add_generation_prompt=True)
            upto = self._render(conversation[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise ConfigError(
                    "the chat template does not render conversations prefix-stably (rendering the first "
                    "turns differs from the start of the whole conversation); cannot locate assistant turns"
                )
            segment = upto[len(prefix):]
            start = len(prefix) + len(segment) - len(segment.lstrip())
            texts = [p["text"].strip() for p in conversation[i]["content"] if p["type"] == "text" and p["text"].strip()]
            content_end = start
            if texts:
                found = segment.rfind(texts[-1])
                if found < 0:
                    raise ConfigError(f"the chat template dropped the assistant text of turn {i}")
                content_end = len(prefix) + found + len(texts[-1])
            end = content_end
            rest = upto[content_end:]
            stripped = rest.lstrip(" \t\n")
            for token in self._end_tokens:
                if stripped.startswith(token):
                    end = content_end + (len(rest) - len(stripped)) + len(token)
                    break
            spans.append((start, end))
        return spans

    def encode_text(self, messages: list[dict], image_sizes: Sequence[tuple[int, int]]) -> EncodedText:
        """Tokenize one conversation; `image_sizes` are (width, height) of its images, in order."""
        messages = self._check_messages(messages, len(image_sizes))
        conversation = [{"role": m["role"], "content": _split_parts(m["content"])} for m in messages]
        full = self._render(conversation, add_generation_prompt=False)
        label_spans = self._label_spans(messages, conversation, full)

        n = len(image_sizes)
        counts = [self.image_token_count(w, h, images_in_sample=n) for w, h in image_sizes]
        pieces = full.split(self.image_token)
        if len(pieces) - 1 != n:
            raise DataError(f"the rendered text has {len(pieces) - 1} {self.image_token} tokens for {n} images "
                            "(does the text contain image tokens itself?)", reason="image_token_mismatch")
        # Expand each placeholder and move the label spans by the characters inserted before them.
        expanded, shifts, pos = [pieces[0]], [], len(pieces[0])
        for count, piece in zip(counts, pieces[1:]):
            shifts.append((pos + len(self.image_token), (count - 1) * len(self.image_token)))
            expanded += [self.image_token * count, piece]
            pos += len(self.image_token) + len(piece)

        def moved(char: int) -> int:
            return char + sum(extra for at, extra in shifts if at <= char)

        spans = [(moved(s), moved(e)) for s, e in label_spans]
        enc = self.tokenizer("".join(expanded), return_offsets_mapping=True)
        input_ids: list[int] = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(input_ids)
        for k, ((start, end), token_id) in enumerate(zip(enc["offset_mapping"], input_ids)):
            # Overlap, not containment: a token merging a leading space into the content is trained.
            # Zero-width tokens (a BOS the tokenizer adds) never are.
            if token_id != self.image_token_id and end > start and any(start < e and s < end for s, e in spans):
                labels[k] = token_id
        return EncodedText(input_ids, labels, self._image_spans(input_ids, counts))

    def _image_spans(self, input_ids: list[int], counts: list[int]) -> list[tuple[int, int]]:
        spans, k = [], 0
        for count in counts:
            while k < len(input_ids) and input_ids[k] != self.image_token_id:
                k += 1
            if input_ids[k : k + count] != [self.image_token_id] * count:
                raise DataError("image placeholder tokens were not tokenized as expected",
                                reason="image_token_mismatch")
            spans.append((k, k + count))
            k += count
        if self.image_token_id in input_ids[k:]:
            raise DataError("more image tokens than images", reason="image_token_mismatch")
        return spans

    # ----------------------------------------------------------------------------------------- pixels
    def encode_images(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """This sample's vision tensors (the processor's image path); {} for a text-only sample."""
        if not images:
            return {}
        # Nested: one sample holding all its images (OneVision switches to multi-image mode on it).
        out = self.processor(images=[list(images)], return_tensors="pt")
        return {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}

    # ---------------------------------------------------------------------------------------- collate
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad text, merge vision tensors in the family's layout, add attention_mask (and mm_token_type_ids)."""
        if not samples:
            raise ValueError("collate needs at least one sample")
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.family.is_qwen:
            # transformers 5 builds Qwen's mRoPE positions from it; the processor returns it too.
            batch["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        batch.update(_merge_vision(samples))
        return batch

    def collate_packed(self, rows: list[list[dict]], rope_index: RopeIndexFn | None = None) -> dict[str, torch.Tensor]:
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
            raise ValueError("collate_packed needs at least one row and no empty row")
        if self.family.is_qwen and rope_index is None:
            raise ValueError(f"packing {self.family.name} needs the model's get_rope_index (per-sample mRoPE)")
        lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
        length = max(lengths)
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        text_pos = torch.zeros(shape, dtype=torch.long)
        mrope = torch.zeros((3, *shape), dtype=torch.long) if self.family.is_qwen else None
        for r, row in enumerate(rows):
            at = 0
            for sample in row:
                ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
                n = len(ids)
                input_ids[r, at:at + n] = ids
                labels[r, at + 1:at + n] = torch.as_tensor(sample["labels"], dtype=torch.long)[1:]
                text_pos[r, at:at + n] = torch.arange(n)
                if mrope is not None:
                    mrope[:, r, at:at + n] = self._sample_mrope(ids, sample, rope_index)
                at += n
            # Row padding restarts its positions too, so it forms its own block in the mask.
            text_pos[r, at:] = torch.arange(length - at)
            if mrope is not None:
                mrope[:, r, at:] = torch.arange(length - at)
        batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}
        if mrope is not None:
            batch["position_ids"] = torch.cat([text_pos[None], mrope], dim=0)
            batch["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        else:
            batch["position_ids"] = text_pos
        # Vision tensors in row-major sample order: the order of the image tokens in the batch.
        batch.update(_merge_vision([s for row in rows for s in row]))
        return batch

    def _sample_mrope(self, ids: torch.Tensor, sample: dict, rope_index: RopeIndexFn | None) -> torch.Tensor:
        """(3, L) mRoPE positions of one sample on its own: what the model computes for it unpacked."""
        if "image_grid_thw" not in sample:
            # Text only: the model's own positions for such a sample are 0..L-1 on all three axes.
            return torch.arange(len(ids)).expand(3, -1)
        assert rope_index is not None  # checked by collate_packed
        types = (ids == self.image_token_id).long()
        positions = rope_index(ids[None], types[None], sample["image_grid_thw"])
        return positions[:, 0].to(torch.long)


def _merge_vision(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The vision tensors of `samples` (those with images), merged in sample order."""
    vision = [s for s in samples if "pixel_values" in s]
    if not vision:
        return {}
    # Only tensors: callers may carry their own bookkeeping keys (e.g. "_index") through.
    keys = [k for k, v in vision[0].items()
            if k not in _TEXT_KEYS and not k.startswith("_") and isinstance(v, torch.Tensor)]
    return {key: _merge(key, [s[key] for s in vision]) for key in keys}


def _merge(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample vision tensors; LLaVA's (images, tiles, C, H, W) pads the tile axis."""
    if key == "pixel_values" and tensors[0].dim() == 5:
        tiles = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, tiles - t.shape[1])) for t in tensors]
    return torch.cat(tensors, dim=0)

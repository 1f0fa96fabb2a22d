"""Encoding: the one place that checks a conversation, places its image tokens and sets its labels.

`prepare_messages` is the conversation rule every record format and every caller of the encoder shares
(roles, turns, one `<image>` per image, placed LLaVA-style when the text has none); ms-swift's grounding
placeholders are rendered in the family's convention (`render_grounding`), and any placeholder left is refused
(`check_rendered`). `SampleEncoder.encode_text`
renders a conversation with the family's chat template, expands each image placeholder to the token count
the processor itself would produce for that image size, and masks labels to the assistant turns (content +
end-of-turn token); `encode_images` runs the processor's image path on decoded pixels (in DataLoader
workers). `encode_conversations` tokenizes a dataset up front and applies `max_length`. The result equals
what `processor(text, images)` gives; batches are assembled in `arctic_vl.data.collate`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import torch

from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.data.bad_records import (
    IMAGE_TOKEN_MISMATCH,
    MALFORMED_TURNS,
    UNRENDERED_PLACEHOLDER,
    UNSUPPORTED_VIDEO,
    BadRecord,
    BadRecordReport,
    OnBadRecord,
    reject_record,
)
from arctic_vl.data.images import UNREADABLE_IMAGE, image_size
from arctic_vl.data.parallel import ordered_map
from arctic_vl.data.records import (
    BBOX_TOKEN,
    BBOX_TYPES,
    GROUNDING_KEY,
    IMAGE_TOKEN,
    PLACEHOLDERS,
    REF_TOKEN,
    ROLES,
    Conversation,
)
from arctic_vl.errors import ConfigError, DataError
from arctic_vl.models.families import FamilySpec

#: the placeholder of a video in a record's text (ms-swift / LLaVA-Video style): not supported
VIDEO_TOKEN = "<video>"
#: what a record with video is told
VIDEO_UNSUPPORTED = ("video is not supported yet: the supported media are images (any format PIL decodes: PNG, "
                     "JPEG, WebP, ...); drop the record or give frames as images")

#: keys of a processor output that belong to the text side; everything else is a vision tensor
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels"})


def prepare_messages(messages: Any, n_images: int, field: str = "messages") -> list[dict[str, str]]:
    """The checked conversation with exactly one `<image>` per image; BadRecord naming `field` otherwise.

    Rules: a list of {role: system|user|assistant, content: str} with at least one user and one assistant
    turn (`malformed_turns`); no `<video>` placeholder (`unsupported_video`: images are the only media); the
    `<image>` count equals `n_images`, or is 0 and then one `<image>` line per image is put at the start of the
    first user turn, the LLaVA convention (else `image_token_mismatch`). Returns a new list (the caller's
    messages are not changed).
    """
    if not isinstance(messages, list):
        raise BadRecord(MALFORMED_TURNS, field, f"must be a list of turns, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord(MALFORMED_TURNS, f"{field}[{i}]", f"must be {{role, content}}, got {m!r:.120}")
        if m["role"] not in ROLES:
            raise BadRecord(MALFORMED_TURNS, f"{field}[{i}]", f"unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            if isinstance(m["content"], list) and any(isinstance(p, dict) and p.get("type") == "video"
                                                      for p in m["content"]):
                raise BadRecord(UNSUPPORTED_VIDEO, f"{field}[{i}].content", VIDEO_UNSUPPORTED)
            raise BadRecord(MALFORMED_TURNS, f"{field}[{i}]",
                            f"content must be a string, got {type(m['content']).__name__}")
        if VIDEO_TOKEN in m["content"]:
            raise BadRecord(UNSUPPORTED_VIDEO, f"{field}[{i}].content", VIDEO_UNSUPPORTED)
    roles = {m["role"] for m in messages}
    for needed in ("user", "assistant"):
        if needed not in roles:
            raise BadRecord(MALFORMED_TURNS, field, f"needs at least one {needed} turn")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if count == n_images:
        return messages
    if count == 0:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_TOKEN}\n" * n_images + first_user["content"]
        return messages
    raise BadRecord(IMAGE_TOKEN_MISMATCH, field, f"{count} {IMAGE_TOKEN} placeholders for {n_images} images")


@dataclass
class EncodedText:
    """Token ids, labels (-100 where not trained) and [start, end) of each image's placeholder tokens.

    `unended`: None, or what the template rendered after an assistant turn that has no end-of-turn or EOS
    token (the first such turn): the model would never learn to stop there.
    """

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    unended: str | None = None


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
    """`"<image>\\nWhat?"` -> [{type: image}, {type: text, text: "What?"}] (HF's multimodal message format).

    The newline that sets a placeholder off from the text belongs to the placeholder (LLaVA's `<image>\\n`
    convention): the one right after each `<image>`, or, for an image that ends the content, the one right
    before it. So the text renders exactly as the model's own template renders an image part followed by the
    question: LLaVA templates add `<image>\\n` themselves, the Qwen ones put the text right after the image.
    """
    chunks = content.split(IMAGE_TOKEN)
    last = len(chunks) - 1
    parts: list[dict[str, str]] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            parts.append({"type": "image"})
            chunk = chunk.removeprefix("\n")
        if i == last - 1 and not chunks[last].strip():
            chunk = chunk.removesuffix("\n")
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


#: marks around each assistant text in the one rendering labels come from (private-use code points; a record
#: holding one is encoded the slower way, with a rendering per turn)
_OPEN, _CLOSE, _MARKS = "\ue000{}\ue001", "\ue002{}\ue003", re.compile("\ue000(\\d+)\ue001|\ue002(\\d+)\ue003")
_MARK_CHARS = re.compile("[\ue000-\ue003]")


def _marked(conversation: list[dict]) -> list[dict]:
    """The conversation with each assistant text part inside the marks of its message (whitespace outside, so
    a template that trims the content trims the same)."""
    out = []
    for i, msg in enumerate(conversation):
        if msg["role"] == "assistant":
            parts = []
            for p in msg["content"]:
                if p["type"] == "text":
                    text = p["text"]
                    core = text.strip()
                    lead, trail = text[:len(text) - len(text.lstrip())], text[len(text.rstrip()):]
                    p = {**p, "text": lead + _OPEN.format(i) + core + _CLOSE.format(i) + trail}
                parts.append(p)
            msg = {**msg, "content": parts}
        out.append(msg)
    return out


def _unmark(rendered: str) -> tuple[str, dict[int, tuple[int, int]]]:
    """The rendering without the marks, and each marked message's [first open, last close) in it."""
    clean, spans, at = [], {}, 0
    pos = 0
    for m in _MARKS.finditer(rendered):
        clean.append(rendered[at:m.start()])
        pos += m.start() - at
        at = m.end()
        if m.group(1) is not None:
            i = int(m.group(1))
            spans[i] = (spans[i][0] if i in spans else pos, spans.get(i, (pos, pos))[1])
        else:
            i = int(m.group(2))
            spans[i] = (spans.get(i, (pos, pos))[0], pos)
    clean.append(rendered[at:])
    return "".join(clean), spans


#: families whose grounding boxes are absolute pixels of the image the model sees (after the processor's resize);
#: every other family writes them in [0, 1000] (ms-swift's `norm_bbox`: 'none' for Qwen2.5-VL, else 'norm1000')
PIXEL_BOX_FAMILIES = ("qwen2_5_vl",)


def _scaled(v: float, num: int, den: int, limit: int) -> int:
    """round(v * num / den), halves up, on the exact rational value, clamped to [0, limit]."""
    rounded = math.floor(Fraction(v) * num / den + Fraction(1, 2))
    return min(limit, max(0, rounded))


def _points(values: list[int]) -> str:
    """[x1, y1, x2, y2] -> `(x1,y1),(x2,y2)` (ms-swift's bbox string)."""
    return ",".join(f"({x},{y})" for x, y in zip(values[0::2], values[1::2]))


def render_grounding(messages: list[dict[str, Any]], grounding: dict[str, Any], encoder: SampleEncoder,
                     image_sizes: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """`messages` with each `<ref-object>` / `<bbox>` replaced, in order, by the next `grounding` ref / box, as
    ms-swift renders them for the encoder's family.

    Coordinates: Qwen2.5-VL, absolute pixels of the image the model sees (`SampleEncoder.seen_size`); every other
    family, integers in [0, 1000] (x by the image width, y by its height; round half up). Text: the Qwen families
    `<|object_ref_start|>REF<|object_ref_end|>` and `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` (their grounding
    tokens); the LLaVA families `REF` and `[(x1,y1),(x2,y2)]` (ms-swift's default template). A point [x, y]
    renders as one pair. A new list: the caller's messages are not changed.
    """
    family = encoder.family
    pixels = family.name in PIXEL_BOX_FAMILIES
    source = BBOX_TYPES[grounding["bbox_type"]]  # None: pixels of the image as given
    refs, boxes = iter(grounding["ref"]), iter(zip(grounding["bbox"], grounding["image_id"]))

    def box_text(box: list[float], image: int) -> str:
        width, height = image_sizes[image]  # parse_grounding checked the index against the record's images
        extent = (width, height) if source is None else (source, source)
        target = encoder.seen_size(width, height) if pixels else (1000, 1000)
        values = [_scaled(v, target[i % 2], extent[i % 2], target[i % 2]) for i, v in enumerate(box)]
        if family.is_qwen:
            return f"<|box_start|>{_points(values)}<|box_end|>"
        return f"[{_points(values)}]"

    def ref_text(ref: str) -> str:
        return f"<|object_ref_start|>{ref}<|object_ref_end|>" if family.is_qwen else ref

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == REF_TOKEN:
            return ref_text(next(refs))
        return box_text(*next(boxes))

    pattern = re.compile(f"{re.escape(REF_TOKEN)}|{re.escape(BBOX_TOKEN)}")
    return [{**m, "content": pattern.sub(replace, m["content"])} for m in messages]


def check_rendered(messages: list[dict[str, Any]], field: str = "messages") -> None:
    """DataError `unrendered_placeholder` when a message still holds an ms-swift placeholder (`PLACEHOLDERS`):
    nothing replaced it, so it would train as literal text."""
    for i, m in enumerate(messages):
        found = [p for p in PLACEHOLDERS if p in m["content"]]
        if found:
            hint = (" (ms-swift grounding records give `objects: {ref: [...], bbox: [[...]]}` for them)"
                    if REF_TOKEN in found or BBOX_TOKEN in found else "")
            raise DataError(f"field {field}[{i}].content: holds the placeholder {found[0]} after rendering; it would "
                            f"train as literal text{hint}", reason=UNRENDERED_PLACEHOLDER)


class SampleEncoder:
    """Tokenize conversations once and encode images lazily, for one VLM family."""

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
        self.video_token: str | None = getattr(processor, "video_token", None)
        media = {self.image_token, self.video_token, *family.special_tokens.values()}
        self._end_tokens = sorted(special - media, key=len, reverse=True)
        self._marks_work: bool | None = None  # whether one marked rendering gives the labels (checked once)

    # ----------------------------------------------------------------------------------------- counts
    def image_token_count(self, width: int, height: int, *, images_in_sample: int = 1) -> int:
        """How many image tokens the processor expands one `width` x `height` image to.

        `images_in_sample` matters for LLaVA-OneVision, which encodes images of multi-image samples
        without anyres tiling. Memoised: datasets repeat a few image sizes, and the processor's count is slow.
        """
        multi = images_in_sample > 1 and self.family.name == "llava_onevision"
        return self._token_count(width, height, images_in_sample if multi else 1)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (the encoder lives as long as its data)
    def _token_count(self, width: int, height: int, multi: int) -> int:
        if multi > 1:
            # The processor's own multi-image rule (base tile + newline) lives in replace_image_token.
            text = self.processor.replace_image_token({"batch_num_images": [multi]}, image_idx=0)
            return text.count(self.image_token)
        try:
            data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
        except ValueError as e:  # e.g. Qwen's resize refuses an aspect ratio over 200: as `encode_images` says it
            raise DataError(f"the image processor cannot use an image of size {width}x{height} ({e})",
                            reason=UNREADABLE_IMAGE) from None
        return int(data.num_image_tokens[0])

    def seen_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image the model sees for a `width` x `height` input: for the Qwen families the
        image processor's own resize (its module's `smart_resize`, factor patch x merge size, this encoder's pixel
        budget); for the LLaVA families the input size (the model sees tiles of it, not one resized image)."""
        if not self.family.is_qwen:
            return width, height
        ip = self.processor.image_processor
        resize = getattr(importlib.import_module(type(ip).__module__), "smart_resize", None)
        if resize is None:  # every Qwen image processor module defines or imports it
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as resize
        size = ip.size if isinstance(ip.size, dict) else dict(ip.size)
        factor = int(ip.patch_size) * int(ip.merge_size)
        h, w = resize(height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return int(w), int(h)

    # ------------------------------------------------------------------------------------------- text
    @property
    def template_name(self) -> str:
        """How messages name the chat template: the model directory it came from."""
        return f"the chat template of {getattr(self.tokenizer, 'name_or_path', '') or 'the processor'}"

    def _render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        # The processor's template is the VLM one; the tokenizer's may be text-only.
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return owner.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _end_of_turn(self, text: str, content_end: int) -> tuple[int, str | None]:
        """Where an assistant turn's trained text ends: after the end-of-turn (or EOS) token that follows its
        content (whitespace between them allowed); with none, at the content, and what follows it instead."""
        rest = text[content_end:]
        stripped = rest.lstrip(" \t\n")
        for token in self._end_tokens:
            if stripped.startswith(token):
                return content_end + (len(rest) - len(stripped)) + len(token), None
        return content_end, rest[:24]

    def _rendered(self, messages: list[dict], conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation rendered once, and the character span of each assistant turn's content (+ its
        end-of-turn token, when the template renders one) in it.

        The assistant texts carry marks through that one rendering; a template that changes them (or a record
        holding the marks' characters) falls back to rendering the turns one prefix at a time.
        """
        if self._marks_work is not False and not any(_MARK_CHARS.search(m["content"]) for m in messages):
            marked, content = _unmark(self._render(_marked(conversation), add_generation_prompt=False))
            wanted = [i for i, m in enumerate(conversation) if m["role"] == "assistant" and m["content"]]
            if all(i in content for i in wanted):
                if self._marks_work is None:  # once per encoder: the marks change nothing else
                    self._marks_work = marked == self._render(conversation, add_generation_prompt=False)
                if self._marks_work:
                    return marked, [content[i] for i in wanted]
        full = self._render(conversation, add_generation_prompt=False)
        return full, self._content_by_prefix(conversation, full)

    def _content_by_prefix(self, conversation: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans of each assistant turn's content in `full`, from renderings of its prefixes."""
        spans = []
        for i, msg in enumerate(conversation):
            if msg["role"] != "assistant" or not msg["content"]:
                continue
            prefix = self._render(conversation[:i], add_generation_prompt=True)
            upto = self._render(conversation[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise ConfigError(
                    f"{self.template_name} does not render conversations prefix-stably (rendering the first "
                    "turns differs from the start of the whole conversation); cannot locate assistant turns"
                )
            segment = upto[len(prefix):]
            start = len(prefix) + len(segment) - len(segment.lstrip())
            texts = [p["text"].strip() for p in msg["content"] if p["type"] == "text" and p["text"].strip()]
            content_end = start
            if texts:
                found = segment.rfind(texts[-1])
                if found < 0:
                    raise ConfigError(f"{self.template_name} dropped the assistant text of turn {i}")
                content_end = len(prefix) + found + len(texts[-1])
            spans.append((start, content_end))
        return spans

    def encode_text(self, messages: list[dict], image_sizes: Sequence[tuple[int, int]]) -> EncodedText:
        """Tokenize one conversation; `image_sizes` are (width, height) of its images, in order.

        The conversation is checked by `prepare_messages` (DataError with its reason otherwise) and the
        encoder's `system_prompt` is put first when the conversation has no system turn of its own. The chat
        template is rendered once; an assistant turn whose rendering has no end-of-turn token after it is
        noted in `EncodedText.unended` (the data factory and inspect-data warn).
        """
        try:
            messages = prepare_messages(messages, len(image_sizes))
        except BadRecord as e:
            raise DataError(str(e), reason=e.reason) from None
        check_rendered(messages)
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        conversation = [{"role": m["role"], "content": _split_parts(m["content"])} for m in messages]
        full, content = self._rendered(messages, conversation)
        if self.video_token and self.video_token in full:
            raise DataError(f"the text holds the video token {self.video_token}: video is not supported (images "
                            "only)", reason=UNSUPPORTED_VIDEO)
        label_spans, unended = [], None
        for start, content_end in content:
            end, missing = self._end_of_turn(full, content_end)
            label_spans.append((start, end))
            if missing is not None and unended is None:
                unended = missing

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
        return EncodedText(input_ids, labels, self._image_spans(input_ids, counts), unended)

    def encode_conversation(self, conv: Conversation, image_sizes: Sequence[tuple[int, int]]) -> EncodedText:
        """`encode_text` of a read record: its ms-swift grounding objects (`meta[GROUNDING_KEY]`) rendered into
        its messages first (`render_grounding`)."""
        messages = conv.messages
        grounding = conv.meta.get(GROUNDING_KEY)
        if grounding:
            messages = render_grounding(messages, grounding, self, image_sizes)
        return self.encode_text(messages, image_sizes)

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
        try:
            out = self.processor(images=[list(images)], return_tensors="pt")
        except ValueError as e:  # e.g. Qwen's resize refuses an aspect ratio over 200
            raise DataError(f"the image processor cannot use the image(s) of sizes {[im.size for im in images]} "
                            f"({e})", reason=UNREADABLE_IMAGE) from e
        return {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}


def unended_warning(encoder: SampleEncoder, conversations: list[Conversation],
                    encoded: list[EncodedText]) -> str | None:
    """The warning for samples whose assistant turns end with no end-of-turn or EOS token (None: all do)."""
    unended = [(c, e) for c, e in zip(conversations, encoded) if e.unended is not None]
    if not unended:
        return None
    conv, enc = unended[0]
    return (f"{encoder.template_name} renders no end-of-turn or EOS token after an assistant turn in {len(unended)} "
            f"of {len(encoded)} samples (e.g. {conv.source} {conv.where}: the answer is followed by {enc.unended!r}), "
            "so that turn's labels do not end with one and the model never learns to stop there. Fix the template "
            f"(chat_template.jinja in the model directory) to put the EOS token ({encoder.tokenizer.eos_token!r}) "
            "after every assistant turn")


def _encode_one(conv: Conversation, encoder: SampleEncoder, max_length: int | None,
                on_image_truncation: Literal["drop", "keep"]) -> EncodedText | tuple[bool, str, str]:
    """One conversation's encoding under the `max_length` policy, or (is a bad record, reason, message)."""
    try:
        sizes = conv.image_sizes if conv.image_sizes is not None else [image_size(r) for r in conv.images]
        enc = encoder.encode_conversation(conv, sizes)
    except DataError as e:
        reason = e.reason or "invalid_record"
        return True, reason, f"{conv.source}: {conv.where}: {e} [reason: {reason}]"
    if max_length is not None and len(enc.input_ids) > max_length:
        cut = max_length
        if any(start < cut < end or start >= cut for start, end in enc.image_spans):
            if on_image_truncation == "drop":
                return False, "too_long_image_cut", (f"{conv.source}: {conv.where}: {len(enc.input_ids)} tokens > "
                                                     f"max_length {cut} and the cut would drop image tokens")
        else:
            enc.input_ids, enc.labels = enc.input_ids[:cut], enc.labels[:cut]
    if all(label == IGNORE_INDEX for label in enc.labels[1:]):
        return False, "no_trained_tokens", f"{conv.source}: {conv.where}: no assistant tokens left to train on"
    return enc


def encode_each(conversations: list[Conversation], encoder: SampleEncoder, report: BadRecordReport, *,
                max_length: int | None, on_image_truncation: Literal["drop", "keep"] = "drop",
                on_bad_record: OnBadRecord = "error", workers: int | None = 1) -> list[EncodedText | None]:
    """Each conversation's encoding, or None where it is dropped (counted in `report`); see
    `encode_conversations`. `workers` processes tokenize (the result does not depend on how many: the policy is
    applied in conversation order)."""
    out: list[EncodedText | None] = []
    results = ordered_map(lambda c: _encode_one(c, encoder, max_length, on_image_truncation), conversations, workers)
    for conv, result in zip(conversations, results):
        if isinstance(result, EncodedText):
            out.append(result)
            continue
        bad, reason, message = result
        if bad:
            reject_record(on_bad_record, report, conv.source, conv.index, reason, message)
        else:
            report.add(conv.source, conv.index, reason, message)
        out.append(None)
    return out


def encode_conversations(conversations: list[Conversation], encoder: SampleEncoder, report: BadRecordReport, *,
                         max_length: int | None, on_image_truncation: Literal["drop", "keep"] = "drop",
                         on_bad_record: OnBadRecord = "error",
                         workers: int | None = 1) -> tuple[list[Conversation], list[EncodedText]]:
    """Tokenize every conversation and apply `max_length`; returns the kept (conversations, encodings).

    Image sizes come from the headers the reader already read (`Conversation.image_sizes`), else from the
    headers now. A sample longer than `max_length` is cut there unless the cut would fall inside or before
    an image: then it is dropped (`too_long_image_cut`, counted) or, with `on_image_truncation: keep`,
    kept whole. A sample left with no trained token is dropped (`no_trained_tokens`, counted). A sample
    the encoder rejects follows `on_bad_record`.
    """
    encoded = encode_each(conversations, encoder, report, max_length=max_length,
                          on_image_truncation=on_image_truncation, on_bad_record=on_bad_record, workers=workers)
    kept = [(c, e) for c, e in zip(conversations, encoded) if e is not None]
    return [c for c, _ in kept], [e for _, e in kept]

"""`bbu_detection` data: the core's `vlm` data (messages JSONL) plus each sample's detection targets and spans.

The YAML section is the core's `vlm` section under `type: bbu_detection` (same keys). On top of it:

* every record's `objects` is checked against its LAST image (`bbu_detection.records`), following
  `data.on_bad_record` (error: exit 2 naming the file, the record and the field; skip: counted by reason);
* each item carries `_targets` (normalised cxcywh boxes and caption token ids, in the record's object order)
  and `_spans` (teacher / student span id per token); the collator passes them through as bookkeeping keys,
  which the model never sees.

Packing is refused: the head reads one sample's image and text per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from arctic_vl import (
    DATA,
    ConfigError,
    DataError,
    SourceSpec,
    VLMDataConfig,
    VLMDataFactory,
    image_size,
)

from .boxes import pixel_xyxy_to_cxcywh
from .records import check_detection_record  # (importing .records registers the record format)
from .spans import span_ids

#: bookkeeping keys this data adds to a batch
TARGETS, SPANS = "_targets", "_spans"


class DetectionDataConfig(VLMDataConfig):
    """The `data:` section of `bbu_detection`: the core VLM data options (packing must stay off)."""

    type: str = "bbu_detection"


@dataclass
class Targets:
    """One sample's ground truth: `boxes` (N, 4) normalised cxcywh, `captions` N token-id lists (each ending
    with the caption end token), `size` (width, height) of the student image, `real` False for a padding sample."""

    boxes: torch.Tensor
    captions: list[list[int]]
    size: tuple[int, int]
    real: bool = True

    @property
    def count(self) -> int:
        """The number of ground-truth objects (0 for a padding sample)."""
        return int(self.boxes.shape[0]) if self.real else 0


def caption_ids(tokenizer: Any, desc: str, end_id: int, max_tokens: int) -> tuple[list[int], bool]:
    """`desc` as caption tokens + the end token, at most `max_tokens` in all; and whether it was cut."""
    ids = list(tokenizer(desc, add_special_tokens=False)["input_ids"])
    cut = len(ids) > max_tokens - 1
    return [*ids[:max_tokens - 1], end_id], cut


class DetectionDataset(torch.utils.data.Dataset):
    """The core dataset's items plus `_targets` and `_spans` (a padding sample, index -1, gets no targets)."""

    def __init__(self, base: Any, targets: list[Targets], spans: list[list[int]]):
        self.base = base
        self.targets = targets
        self.spans = spans
        # what the core's evaluation and the CLI read from a dataset
        self.conversations, self.encoded, self.lengths = base.conversations, base.encoded, base.lengths

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, tuple):
            raise DataError("bbu_detection data cannot be packed (set data.packing: false)")
        item = self.base[index]
        i = 0 if index == -1 else index
        t = self.targets[i]
        item[TARGETS] = t if index != -1 else Targets(t.boxes[:0], [], t.size, real=False)
        # a padding sample (index -1) is one untrained token: no span (not sample 0's spans)
        spans = self.spans[i] if index != -1 else [0] * len(item["input_ids"])
        item[SPANS] = torch.tensor(spans, dtype=torch.long)
        return item


class DetectionCollator:
    """The core collator, then `_targets` (list of Targets) and `_spans` (B, T) padded with 0 (no span)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The core collator's batch, plus `_targets` (the Targets list) and `_spans` (B, T) padded with 0."""
        targets = [s.pop(TARGETS) for s in samples]
        spans = [s.pop(SPANS) for s in samples]
        batch = self.inner(samples)
        length = batch["input_ids"].shape[1]
        padded = torch.zeros((len(spans), length), dtype=torch.long)
        for row, s in enumerate(spans):
            padded[row, :len(s)] = s
        batch[TARGETS] = targets
        batch[SPANS] = padded
        return batch


@DATA.register("bbu_detection")
class DetectionDataFactory(VLMDataFactory):
    """The core's `vlm` factory with detection records; needs the `bbu_detection` model (its head's settings)."""

    config_class = DetectionDataConfig

    def build(self, model_bundle: Any, *, seed: int) -> Any:
        """The core data bundle with detection targets and spans on each item and the DetectionCollator.

        ConfigError when the model is not `bbu_detection` or `data.packing` is on.
        """
        head_config = model_bundle.extras.get("head_config")
        if head_config is None:
            raise ConfigError("data.type bbu_detection needs model.type bbu_detection (the detection head defines "
                              "how many objects an image may have and how captions are tokenized)")
        if self.config.packing:
            raise ConfigError(
                "data.packing: bbu_detection reads one sample's image and text per row; set packing: false"
            )
        self._head = head_config
        self._tokenizer = getattr(model_bundle.processor, "tokenizer", model_bundle.processor)
        self._cut = 0
        bundle = super().build(model_bundle, seed=seed)
        bundle.train = self._wrap(bundle.train)
        if bundle.eval is not None:
            bundle.eval = self._wrap(bundle.eval)
        bundle.collate = DetectionCollator(bundle.collate)
        objects = sum(t.count for t in bundle.train.targets)
        bundle.stats.update(train_objects=objects, caption_tokens_cut=self._cut)
        return bundle

    def source_spec(self, spec: Any) -> SourceSpec:
        """A source spec whose `format: auto` (or a bare path) becomes `format: bbu_detection`, the record format
        that checks the objects with the file's line numbers."""
        spec = super().source_spec(spec)
        return spec.model_copy(update={"format": "bbu_detection"}) if spec.format == "auto" else spec

    def check(self, conv: Any) -> Any:
        """Each record's objects against the head (at most `num_queries`) and its last image; the core applies
        `data.on_bad_record` to a BadRecord."""
        sizes = conv.image_sizes or [image_size(ref) for ref in conv.images]
        width, height = sizes[-1] if sizes else (0, 0)
        objects = check_detection_record(conv.messages, len(conv.images), conv.meta.get("objects"), width, height,
                                         max_objects=self._max_objects())
        conv.meta = {**conv.meta, "objects": objects, "student_size": (width, height)}
        return conv

    def _max_objects(self) -> int | None:
        """The head's query count: from the built model, else from the config (`inspect-data` reads only)."""
        head = getattr(self, "_head", None)
        if head is not None:
            return int(head.num_queries)
        detection = getattr(getattr(self.engine_config, "model", None), "detection", None)
        return getattr(detection, "num_queries", None)

    def _wrap(self, dataset: Any) -> DetectionDataset:
        targets, spans = [], []
        end, most = self._head.caption_end_id, self._head.max_caption_tokens
        for conv, enc in zip(dataset.conversations, dataset.encoded):
            width, height = conv.meta["student_size"]
            objects = conv.meta["objects"]
            boxes = torch.tensor([o["bbox_2d"] for o in objects], dtype=torch.float32).reshape(-1, 4)
            captions = []
            for o in objects:
                ids, cut = caption_ids(self._tokenizer, o["desc"], end, most)
                captions.append(ids)
                self._cut += int(cut)
            targets.append(Targets(pixel_xyxy_to_cxcywh(boxes, width, height), captions, (width, height)))
            turns = sum(1 for m in conv.messages if m["role"] == "assistant")
            try:
                spans.append(span_ids(enc.labels, turns))
            except ValueError as e:
                raise DataError(f"{conv.source}: record {conv.index}: {e}", source=conv.source, index=conv.index,
                                reason="malformed_turns") from None
        return DetectionDataset(dataset, targets, spans)

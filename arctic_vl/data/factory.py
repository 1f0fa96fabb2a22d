"""The `vlm` data factory: conversations with images, tokenized once up front, pixels decoded lazily.

The walk of one sample: the sources' record files (`sources`, through the registered source kinds and
record formats of `records`) -> `Conversation` (image headers read once, there) -> `encoding` (checked,
image tokens placed, labels set, `max_length` applied) -> `sampling` (the epoch's micro-batches, plain
or packed) -> `collate` (the batch). Up front (cheap): everything but pixels. Per item (in DataLoader
workers): decode pixels and run the image processor. Bad records follow `on_bad_record`; every skip is
counted by reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger
from PIL import Image
from pydantic import Field, model_validator

from arctic_vl.config.paths import ExistingPath as ConfigPath  # data files must exist at validation
from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.data.bad_records import BadRecordReport, OnBadRecord
from arctic_vl.data.base import DataBundle, DataFactory
from arctic_vl.data.collate import ITEM_INDEX, ITEM_ROW, Collator, PackedCollator, RopeIndex
from arctic_vl.data.encoding import EncodedText, SampleEncoder, encode_conversations
from arctic_vl.data.images import image_size, open_image
from arctic_vl.data.records import Conversation
from arctic_vl.data.sampling import PADDING_INDEX, PackingPlanner
from arctic_vl.data.sources import SourceSpec, read_sources
from arctic_vl.errors import DataError
from arctic_vl.registry import DATA, ComponentConfig


class VLMDataConfig(ComponentConfig):
    """The `vlm` data section: sources (mixed by weight), lengths, the bad-record policy, images, packing."""

    type: str = "vlm"
    sources: list[ConfigPath | SourceSpec] = Field(
        ..., min_length=1, description="data files: a path, or {path, format, sample, weight, image_root}"
    )
    eval_sources: list[ConfigPath | SourceSpec] = Field(default_factory=list)
    micro_batch_size: int = Field(1, ge=1, description="samples per process per forward; with packing: packed rows")
    max_length: int | None = Field(2048, ge=8, description="tokens per sample; longer samples are truncated")
    on_image_truncation: Literal["drop", "keep"] = Field(
        "drop", description="a sample whose cut would fall inside an image: drop it (counted) or keep it whole"
    )
    on_bad_record: OnBadRecord = "error"
    num_workers: int = Field(0, ge=0)
    shuffle: bool = True
    system_prompt: str | None = None
    min_pixels: int | None = Field(None, ge=1, description="Qwen-VL image budget")
    max_pixels: int | None = Field(None, ge=1, description="Qwen-VL image budget")
    image_grid_pinpoints: list[list[int]] | None = Field(None, description="LLaVA any-res grid")
    blank_images: bool = Field(False, description="replace every image by a blank one of the same size (blind baseline)")
    packing: bool = Field(False, description="pack whole samples into rows of up to max_length tokens "
                          "(best-fit, padding-free; micro_batch_size counts rows)")

    @model_validator(mode="after")
    def _packing_needs_length(self) -> VLMDataConfig:
        if self.packing and self.max_length is None:
            raise ValueError("packing: true needs max_length (the tokens of one packed row), e.g. max_length: 2048")
        return self


class VLMDataset(torch.utils.data.Dataset):
    """Pre-tokenized samples; `__getitem__` decodes this sample's images only.

    An index is a sample index (-1: a padding sample, no labels) or a packing plan's (row, sample) key.
    """

    def __init__(self, conversations: list[Conversation], encoded: list[EncodedText], encoder: SampleEncoder,
                 blank_images: bool = False):
        self.conversations = conversations
        self.encoded = encoded
        self.encoder = encoder
        self.blank_images = blank_images
        self.lengths = [len(e.input_ids) for e in encoded]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        row = None
        if isinstance(index, tuple):  # a packing plan's (row, sample) key, see arctic_vl.data.sampling
            row, index = index
        padding = index == PADDING_INDEX
        i = 0 if padding else index
        enc, conv = self.encoded[i], self.conversations[i]
        item: dict[str, Any] = {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.full((len(enc.labels),), IGNORE_INDEX, dtype=torch.long) if padding
            else torch.tensor(enc.labels, dtype=torch.long),
        }
        if conv.images:
            if self.blank_images:
                sizes = conv.image_sizes if conv.image_sizes is not None else [image_size(r) for r in conv.images]
                images = [Image.new("RGB", size, (127, 127, 127)) for size in sizes]
            else:
                images = [open_image(ref) for ref in conv.images]
            item.update(self.encoder.encode_images(images))
        item[ITEM_INDEX] = index
        if row is not None:
            item[ITEM_ROW] = row
        return item


@DATA.register("vlm")
class VLMDataFactory(DataFactory):
    """LLaVA json/jsonl, messages JSONL, dense-caption JSONL and `save_to_disk` datasets, mixed by weight."""

    config_class = VLMDataConfig

    def encoder(self, model_bundle: Any) -> SampleEncoder:
        """The sample encoder for the bundle's processor and family, with this config's image budget."""
        c = self.config
        return SampleEncoder(model_bundle.processor, model_bundle.family, min_pixels=c.min_pixels,
                             max_pixels=c.max_pixels, image_grid_pinpoints=c.image_grid_pinpoints,
                             system_prompt=c.system_prompt)

    def read(self, specs: list[Any], *, seed: int, report: BadRecordReport) -> list[Conversation]:
        """The sources' conversations, sampled, weighted and mixed (paths resolved by the config already)."""
        specs = [s if isinstance(s, SourceSpec) else SourceSpec(path=s) for s in specs]
        return read_sources(specs, base_dir=Path.cwd(), seed=seed, on_bad_record=self.config.on_bad_record, report=report)

    def encode(self, conversations: list[Conversation], encoder: SampleEncoder,
               report: BadRecordReport) -> tuple[list[Conversation], list[EncodedText]]:
        """Tokenize the conversations and apply this config's max_length policy; the kept (convs, encodings)."""
        c = self.config
        return encode_conversations(conversations, encoder, report, max_length=c.max_length,
                                    on_image_truncation=c.on_image_truncation, on_bad_record=c.on_bad_record)

    def dataset(self, specs: list[Any], encoder: SampleEncoder, *, seed: int, report: BadRecordReport) -> VLMDataset:
        """The dataset of `specs`: read, encoded; DataError when no sample is left."""
        convs, encoded = self.encode(self.read(specs, seed=seed, report=report), encoder, report)
        if not encoded:
            raise DataError(f"no usable samples in {', '.join(str(getattr(s, 'path', s)) for s in specs)}"
                            f"{': ' + report.format() if report.total else ''}")
        return VLMDataset(convs, encoded, encoder, self.config.blank_images)

    def build(self, model_bundle: Any, *, seed: int) -> DataBundle:
        """Train (and eval) datasets, the collator, the bad-record report and stats; a packing batcher if asked."""
        report = BadRecordReport()
        encoder = self.encoder(model_bundle)
        train = self.dataset(self.config.sources, encoder, seed=seed, report=report)
        evaluation = None
        if self.config.eval_sources:
            evaluation = self.dataset(self.config.eval_sources, encoder, seed=seed, report=report)
        if report.total:
            logger.warning(f"skipped {report.total} records: {report.format()}")
        stats = {"train_samples": len(train), "eval_samples": len(evaluation) if evaluation else 0,
                 "train_tokens": sum(train.lengths), "skipped": report.by_reason()}
        if self.config.packing:
            bundle = self._packed_bundle(model_bundle, encoder, train, evaluation, report, stats, seed)
        else:
            bundle = DataBundle(train=train, eval=evaluation, collate=Collator(encoder), report=report, stats=stats)
        bundle.micro_batch_size, bundle.shuffle = self.config.micro_batch_size, self.config.shuffle
        bundle.num_workers = self.config.num_workers
        return bundle

    def _packed_bundle(self, model_bundle: Any, encoder: SampleEncoder, train: VLMDataset,
                       evaluation: VLMDataset | None, report: BadRecordReport, stats: dict[str, Any],
                       seed: int) -> DataBundle:
        """Packing: a best-fit planner as the bundle's batcher and the packed collator."""
        c = self.config
        assert c.max_length is not None  # the config validator guarantees it
        too_long = [k for k, n in enumerate(train.lengths) if n > c.max_length]
        if too_long:  # only `on_image_truncation: keep` leaves such samples
            conv = train.conversations[too_long[0]]
            raise DataError(
                f"{conv.source}: record {conv.index}: {train.lengths[too_long[0]]} tokens do not fit a packed row of "
                f"data.max_length {c.max_length} ({len(too_long)} such samples, kept whole by on_image_truncation: "
                "keep); with packing use on_image_truncation: drop or raise max_length",
                source=conv.source, index=conv.index, reason="too_long_for_packing")
        planner = PackingPlanner(train.lengths, c.max_length, c.micro_batch_size, seed, c.shuffle)
        stats["packing"] = planner.stats(0)
        p = stats["packing"]
        logger.info(f"packing: {p['samples']} samples into {p['rows']} rows of <= {c.max_length} tokens "
                    f"({p['samples_per_row']:.2f} per row): efficiency {p['efficiency']:.1%} "
                    f"(unpacked, padded to the longest of {c.micro_batch_size}: {p['unpacked_padding_efficiency']:.1%})")
        rope = RopeIndex(model_bundle.model) if model_bundle.family.is_qwen else None
        # Flash attention isolates packed samples only in a batch of one row (see PackedCollator).
        attn = str(getattr(getattr(model_bundle.model, "config", None), "_attn_implementation", None) or "")
        collate = PackedCollator(encoder, c.max_length, Collator(encoder), rope, single_row=attn.startswith("flash"))
        return DataBundle(train=train, eval=evaluation, collate=collate, report=report, stats=stats, batcher=planner)

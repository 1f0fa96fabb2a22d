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

from arctic_vl.config.paths import ConfigPath, ExistingPath
from arctic_vl.data.bad_records import BadRecord, BadRecordReport, OnBadRecord, reject_record
from arctic_vl.data.base import DataBundle, DataFactory
from arctic_vl.data.cache import CachedSource, default_cache_dir, encoder_identity, entry_key
from arctic_vl.data.cache import load as load_entry
from arctic_vl.data.cache import save as save_entry
from arctic_vl.data.collate import (
    ITEM_BAD,
    ITEM_INDEX,
    ITEM_ROW,
    Collator,
    PackedCollator,
    RopeIndex,
    padding_sample,
)
from arctic_vl.data.encoding import (
    EncodedText,
    SampleEncoder,
    encode_conversations,
    encode_each,
    unended_warning,
)
from arctic_vl.data.images import DEFAULT_MAX_IMAGE_PIXELS, UNREADABLE_IMAGE, image_size, open_image
from arctic_vl.data.records import Conversation
from arctic_vl.data.sampling import PADDING_INDEX, BalancedBatcher, PackingPlanner
from arctic_vl.data.sources import SourceSpec, mix, read_source_records, read_sources, source_kind, weigh
from arctic_vl.errors import ConfigError, DataError
from arctic_vl.registry import DATA, ComponentConfig


class VLMDataConfig(ComponentConfig):
    """The `vlm` data section: sources (mixed by weight), lengths, the bad-record policy, images, packing."""

    type: str = "vlm"
    sources: list[ExistingPath | SourceSpec] = Field(
        ..., min_length=1, description="data files: a path, or {path, format, sample, weight, image_root}"
    )
    eval_sources: list[ExistingPath | SourceSpec] = Field(default_factory=list)
    micro_batch_size: int = Field(1, ge=1, description="samples per process per forward; with packing: packed rows")
    max_length: int | None = Field(2048, ge=8, description="tokens per sample; longer samples are truncated")
    on_image_truncation: Literal["drop", "keep"] = Field(
        "drop", description="a sample whose cut would fall inside an image: drop it (counted) or keep it whole"
    )
    on_bad_record: OnBadRecord = "error"
    max_image_pixels: int | None = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="an image with more pixels (width x height, from its header) "
        "is a bad record, image_too_large (a decompression bomb); default: where PIL refuses; null: no limit")
    num_workers: int = Field(0, ge=0)
    shuffle: bool = Field(
        True, description="seeded shuffle of the sources' mix and of every epoch; false keeps file order: sources "
        "in the order listed, each one's records in file order (weight 2.5: the file twice, then a seeded half of "
        "its records, in file order)")
    system_prompt: str | None = None
    min_pixels: int | None = Field(None, ge=1, description="Qwen-VL image budget")
    max_pixels: int | None = Field(None, ge=1, description="Qwen-VL image budget")
    image_grid_pinpoints: list[list[int]] | None = Field(None, description="LLaVA any-res grid")
    blank_images: bool = Field(False, description="replace every image by a blank one of the same size (blind baseline)")
    packing: bool = Field(False, description="pack whole samples into rows of up to max_length tokens "
                          "(best-fit, padding-free; micro_batch_size counts rows)")
    balance_ranks: bool = Field(True, description="share each global batch's samples (packed rows) out so every "
                                "process gets about the same number of tokens; the same samples per global batch")
    cache: bool = Field(True, description="keep each source's encoded records on disk, keyed by everything they "
                        "depend on (data bytes, tokenizer, chat template, settings, code): a second run loads them")
    # created on first use, like output_dir: a path, not one that must exist
    cache_dir: ConfigPath | None = Field(None, description="where (default $ARCTIC_VL_CACHE_DIR, else "
                                         "~/.cache/arctic_vl/encoded)")
    preprocess_workers: int | None = Field(None, ge=1, description="processes that read and tokenize the records "
                                           "up front (default: the cores, shared by the ranks of a machine)")

    @model_validator(mode="after")
    def _sources_are_readable(self) -> VLMDataConfig:
        # what validate can tell without reading records: a kind reads each source, and the files a YAML list
        # names exist (a missing one is found here, not after the model loads)
        for spec in [*self.sources, *self.eval_sources]:
            path, fmt = (Path(spec.path), spec.format) if isinstance(spec, SourceSpec) else (Path(spec), "auto")
            if path.exists():
                try:
                    source_kind(path, fmt).files(path)
                except ConfigError as e:
                    raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _packing_needs_length(self) -> VLMDataConfig:
        if self.packing and self.max_length is None:
            raise ValueError("packing: true needs max_length (the tokens of one packed row), e.g. max_length: 2048")
        return self


class VLMDataset(torch.utils.data.Dataset):
    """Pre-tokenized samples; `__getitem__` decodes this sample's images only.

    An index is a sample index (-1: a padding sample, no labels) or a packing plan's (row, sample) key. A sample
    whose pixels turn out bad here (in a DataLoader worker) comes back tagged `ITEM_BAD` with its source, record
    and reason: the collator drops it from the batch and the main process applies `on_bad_record`
    (`DataBundle.accept`). Decoding is a function of the file, so the same samples are dropped in every epoch,
    on every rank and in a resumed run.
    """

    def __init__(self, conversations: list[Conversation], encoded: list[EncodedText], encoder: SampleEncoder,
                 blank_images: bool = False, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.conversations = conversations
        self.encoded = encoded
        self.encoder = encoder
        self.blank_images = blank_images
        self.max_image_pixels = max_image_pixels
        self.lengths = [len(e.input_ids) for e in encoded]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        row = None
        if isinstance(index, tuple):  # a packing plan's (row, sample) key, see arctic_vl.data.sampling
            row, index = index
        if index == PADDING_INDEX:
            item = padding_sample(self.encoder)
        else:
            item = self._sample(index)
        if row is not None:
            item[ITEM_ROW] = row
        return item

    def _sample(self, index: int) -> dict[str, Any]:
        enc, conv = self.encoded[index], self.conversations[index]
        item: dict[str, Any] = {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                                "labels": torch.tensor(enc.labels, dtype=torch.long), ITEM_INDEX: index}
        if conv.images:
            try:
                item.update(self.encoder.encode_images(self._images(conv)))
            except DataError as e:
                reason = e.reason or UNREADABLE_IMAGE
                item[ITEM_BAD] = (conv.source, conv.index, reason,
                                  f"{conv.source}: {conv.where}: {e} [reason: {reason}; found when loading the sample]")
        return item

    def _images(self, conv: Conversation) -> list[Image.Image]:
        if self.blank_images:
            sizes = conv.image_sizes if conv.image_sizes is not None else [image_size(r) for r in conv.images]
            return [Image.new("RGB", size, (127, 127, 127)) for size in sizes]
        return [open_image(ref, self.max_image_pixels) for ref in conv.images]


@DATA.register("vlm")
class VLMDataFactory(DataFactory):
    """LLaVA json/jsonl, messages JSONL, dense-caption JSONL and `save_to_disk` datasets, mixed by weight."""

    config_class = VLMDataConfig
    _encoder_id: str | None = None  # the encoder's part of the cache key, computed once

    def encoder(self, model_bundle: Any) -> SampleEncoder:
        """The sample encoder for the bundle's processor and family, with this config's image budget."""
        c = self.config
        return SampleEncoder(model_bundle.processor, model_bundle.family, min_pixels=c.min_pixels,
                             max_pixels=c.max_pixels, image_grid_pinpoints=c.image_grid_pinpoints,
                             system_prompt=c.system_prompt)

    # -- hooks for a factory built on this one (bbu_detection: its record format, objects vs the head's queries)
    def source_spec(self, spec: SourceSpec | str) -> SourceSpec:
        """The SourceSpec one configured source entry reads as (a bare path: `SourceSpec(path=...)`). Override to
        change defaults, e.g. `format: auto` -> this factory's own record format; the spec is part of the
        encoded-records cache key, so what it changes can never be served stale."""
        return spec if isinstance(spec, SourceSpec) else SourceSpec(path=spec)

    def check(self, conv: Conversation) -> Conversation:
        """A record-level check of one read conversation against the built model, run on every build (cache hit
        or not): return it (possibly with more `meta`) or raise `BadRecord(reason, field, detail)`, which follows
        `data.on_bad_record` like every bad record (exit 2 naming file, record, field; or counted and skipped).
        Default: unchanged."""
        return conv

    def _checked(self, pairs: list[tuple[Conversation, Any]], report: BadRecordReport
                 ) -> list[tuple[Conversation, Any]]:
        """(conversation, encoding) `pairs` with `check` applied to each conversation still encoded; the rejected
        ones counted (skip) or raised (error)."""
        if type(self).check is VLMDataFactory.check:
            return pairs
        kept = []
        for conv, enc in pairs:
            if not enc:  # already dropped by the encoding (and counted there): kept in place for the weighing
                kept.append((conv, enc))
                continue
            try:
                kept.append((self.check(conv), enc))
            except BadRecord as e:
                reject_record(self.config.on_bad_record, report, conv.source, conv.index, e.reason,
                              f"{conv.source}: {conv.where}: field {e.field}: {e.detail} [reason: {e.reason}]")
        return kept

    def read(self, specs: list[Any], *, seed: int, report: BadRecordReport, shuffle: bool | None = None,
             fingerprints: dict[str, Any] | None = None) -> list[Conversation]:
        """The sources' conversations, sampled, weighted and mixed (paths resolved by the config already), each
        through `check`.

        `shuffle` (default: `data.shuffle`) mixes the sources with a seeded shuffle; without it they stay in
        the order listed and each source's records in file order. `fingerprints` gets each source's.
        """
        specs = [self.source_spec(s) for s in specs]
        convs = read_sources(specs, base_dir=Path.cwd(), seed=seed, on_bad_record=self.config.on_bad_record,
                             report=report, shuffle=self.config.shuffle if shuffle is None else shuffle,
                             max_image_pixels=self.config.max_image_pixels, fingerprints=fingerprints)
        return [conv for conv, _ in self._checked([(c, True) for c in convs], report)]

    def encode(self, conversations: list[Conversation], encoder: SampleEncoder,
               report: BadRecordReport) -> tuple[list[Conversation], list[EncodedText]]:
        """Tokenize the conversations and apply this config's max_length policy; the kept (convs, encodings)."""
        c = self.config
        return encode_conversations(conversations, encoder, report, max_length=c.max_length,
                                    on_image_truncation=c.on_image_truncation, on_bad_record=c.on_bad_record)

    def load(self, specs: list[Any], encoder: SampleEncoder, *, seed: int, report: BadRecordReport,
             shuffle: bool | None = None, fingerprints: dict[str, Any] | None = None,
             cache_stats: dict[str, str] | None = None) -> tuple[list[Conversation], list[EncodedText]]:
        """The kept (conversations, encodings) of `specs`, in training order: each source read and encoded once
        (or loaded from the encoded-records cache), then weighted and mixed like `read` (`shuffle`: default
        `data.shuffle`). `fingerprints` gets each source's; `cache_stats` whether it was a cache hit."""
        c = self.config
        pairs: list[tuple[Conversation, EncodedText | None]] = []
        for spec in (self.source_spec(s) for s in specs):
            entry, state = self._source(spec, encoder, seed)
            report.merge(entry.report)
            if fingerprints is not None:
                fingerprints[str(spec.path)] = entry.fingerprint
            if cache_stats is not None:
                cache_stats[str(spec.path)] = state
            # checked before weighing: a record repeated by its weight is one record, counted once
            pairs += weigh(self._checked(list(zip(entry.conversations, entry.encoded)), report), spec, seed)
        kept = [(conv, enc) for conv, enc in mix(pairs, seed, c.shuffle if shuffle is None else shuffle) if enc]
        return [conv for conv, _ in kept], [enc for _, enc in kept]

    def _source(self, spec: SourceSpec, encoder: SampleEncoder, seed: int) -> tuple[CachedSource, str]:
        """One source's distinct records and encodings, from the cache ("hit") or read and encoded now ("miss",
        then saved; "off" without the cache; "unsaved" when its records do not serialise)."""
        c = self.config
        path = Path(spec.path)
        key = directory = None
        if c.cache:
            directory = Path(c.cache_dir) if c.cache_dir else default_cache_dir()
            if self._encoder_id is None:
                self._encoder_id = encoder_identity(encoder)
            settings = {"source": spec.model_dump(), "seed": seed, "on_bad_record": c.on_bad_record,
                        "max_image_pixels": c.max_image_pixels, "max_length": c.max_length,
                        "on_image_truncation": c.on_image_truncation}
            key = entry_key(source_kind(path, spec.format).files(path), self._encoder_id, settings)
            hit = load_entry(directory, key)
            if hit is not None:
                return hit, "hit"
        report, fingerprint = BadRecordReport(), {}
        workers = c.preprocess_workers
        convs = read_source_records(spec, base_dir=Path.cwd(), seed=seed, on_bad_record=c.on_bad_record,
                                    report=report, max_image_pixels=c.max_image_pixels, fingerprints=fingerprint,
                                    workers=workers)
        encoded = encode_each(convs, encoder, report, max_length=c.max_length, workers=workers,
                              on_image_truncation=c.on_image_truncation, on_bad_record=c.on_bad_record)
        entry = CachedSource(convs, encoded, report, next(iter(fingerprint.values())))
        if directory is None or key is None:
            return entry, "off"
        return entry, "miss" if save_entry(directory, key, entry) is not None else "unsaved"

    def dataset(self, specs: list[Any], encoder: SampleEncoder, *, seed: int, report: BadRecordReport,
                fingerprints: dict[str, Any] | None = None,
                cache_stats: dict[str, str] | None = None) -> VLMDataset:
        """The dataset of `specs`: read, encoded (or loaded from the cache); DataError when no sample is left."""
        convs, encoded = self.load(specs, encoder, seed=seed, report=report, fingerprints=fingerprints,
                                   cache_stats=cache_stats)
        if not encoded:
            raise DataError(f"no usable samples in {', '.join(str(getattr(s, 'path', s)) for s in specs)}"
                            f"{': ' + report.format() if report.total else ''}")
        return VLMDataset(convs, encoded, encoder, self.config.blank_images, self.config.max_image_pixels)

    def build(self, model_bundle: Any, *, seed: int) -> DataBundle:
        """Train (and eval) datasets, the collator, the bad-record report and stats; a packing batcher if asked."""
        report = BadRecordReport()
        encoder = self.encoder(model_bundle)
        fingerprint: dict[str, Any] = {}  # saved with checkpoints: a resume on changed data is refused
        cache: dict[str, str] = {}
        train = self.dataset(self.config.sources, encoder, seed=seed, report=report, fingerprints=fingerprint,
                             cache_stats=cache)
        evaluation = None
        if self.config.eval_sources:
            evaluation = self.dataset(self.config.eval_sources, encoder, seed=seed, report=report, cache_stats=cache)
        if report.total:
            logger.warning(f"skipped {report.total} records: {report.format()}")
        warning = unended_warning(encoder, train.conversations, train.encoded)
        if warning:
            logger.warning(warning)
        stats = {"train_samples": len(train), "eval_samples": len(evaluation) if evaluation else 0,
                 "train_tokens": sum(train.lengths), "skipped": report.by_reason(),
                 "cache": {"dir": str(self.config.cache_dir or default_cache_dir()) if self.config.cache else None,
                           "sources": cache}}
        if self.config.packing:
            bundle = self._packed_bundle(model_bundle, encoder, train, evaluation, report, stats, seed)
        else:
            batcher = None
            if self.config.balance_ranks:  # the plain plan on one process; token-balanced ranks on several
                batcher = BalancedBatcher(train.lengths, self.config.micro_batch_size, seed, self.config.shuffle)
            bundle = DataBundle(train=train, eval=evaluation, collate=Collator(encoder), report=report, stats=stats,
                                batcher=batcher)
        bundle.micro_batch_size, bundle.shuffle = self.config.micro_batch_size, self.config.shuffle
        bundle.num_workers = self.config.num_workers
        bundle.on_bad_record, bundle.fingerprint = self.config.on_bad_record, fingerprint
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
        planner = PackingPlanner(train.lengths, c.max_length, c.micro_batch_size, seed, c.shuffle, c.balance_ranks)
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

"""`vlm`: conversations with images, tokenized once up front, pixels decoded lazily in the workers.

Up front (cheap): read the sources, read each image's size from its header, tokenize the text with
image placeholders expanded, apply `max_length`. Per item (in DataLoader workers): decode pixels and
run the image processor. Bad records follow `on_bad_record`; every skip is counted by reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from loguru import logger
from pydantic import Field, model_validator

from arctic_vl.config.paths import ExistingPath as ConfigPath  # data files must exist at validation
from arctic_vl.data.base import DataBundle, DataFactory
from arctic_vl.errors import DataError
from arctic_vl.registry import DATA, ComponentConfig


def _source_spec_type() -> Any:
    from arctic_vl.data.sources import SourceSpec

    return SourceSpec


class VLMDataConfig(ComponentConfig):
    type: str = "vlm"
    sources: list[ConfigPath | _source_spec_type()] = Field(  # type: ignore[valid-type]
        ..., min_length=1, description="data files: a path, or {path, format, sample, weight, image_root}"
    )
    eval_sources: list[ConfigPath | _source_spec_type()] = Field(default_factory=list)  # type: ignore[valid-type]
    micro_batch_size: int = Field(1, ge=1, description="samples per process per forward; with packing: packed rows")
    max_length: int | None = Field(2048, ge=8, description="tokens per sample; longer samples are truncated")
    on_image_truncation: Literal["drop", "keep"] = Field(
        "drop", description="a sample whose cut would fall inside an image: drop it (counted) or keep it whole"
    )
    on_bad_record: Literal["error", "skip"] = "error"
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
    """Pre-tokenized samples; `__getitem__` decodes this sample's images only."""

    def __init__(self, conversations: list[Any], encoded: list[Any], encoder: Any, blank_images: bool = False):
        self.conversations = conversations
        self.encoded = encoded
        self.encoder = encoder
        self.blank_images = blank_images
        self.lengths = [len(e.input_ids) for e in encoded]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        from arctic_vl.data.images import image_size, open_image

        row = None
        if isinstance(index, tuple):  # a packing plan's (row, sample) key, see arctic_vl.data.packing
            row, index = index
        padding = index == -1  # see EpochBatchSampler: a sample that trains nothing
        i = 0 if padding else index
        enc, conv = self.encoded[i], self.conversations[i]
        item: dict[str, Any] = {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.full((len(enc.labels),), -100, dtype=torch.long) if padding
            else torch.tensor(enc.labels, dtype=torch.long),
        }
        if conv.images:
            if self.blank_images:
                from PIL import Image

                images = [Image.new("RGB", image_size(ref), (127, 127, 127)) for ref in conv.images]
            else:
                images = [open_image(ref) for ref in conv.images]
            item.update(self.encoder.encode_images(images))
        item["_index"] = index
        if row is not None:
            item["_row"] = row
        return item


class Collator:
    """The family's collate plus bookkeeping the loop needs (sample indices, real-token counts)."""

    def __init__(self, encoder: Any):
        self.encoder = encoder

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [s.pop("_index") for s in samples]
        batch = self.encoder.collate(samples)
        batch["_indices"] = indices
        real = [i != -1 for i in indices]
        batch["_num_samples"] = sum(real)
        batch["_num_tokens"] = int(sum(len(s["input_ids"]) for s, r in zip(samples, real) if r))
        return batch


def scan(conversations: list[Any], encoder: Any, cfg: VLMDataConfig, report: Any) -> tuple[list[Any], list[Any]]:
    """Tokenize every conversation (image sizes from headers) and apply max_length; returns kept (convs, encoded)."""
    from arctic_vl.data.images import image_size

    kept_c, kept_e = [], []
    for conv in conversations:
        try:
            sizes = [image_size(ref) for ref in conv.images]
            enc = encoder.encode_text(conv.messages, sizes)
        except DataError as e:
            _bad(cfg, report, conv, e.reason or "invalid_record", str(e))
            continue
        if cfg.max_length is not None and len(enc.input_ids) > cfg.max_length:
            cut = cfg.max_length
            if any(start < cut < end for start, end in enc.image_spans) or any(start >= cut for start, _ in enc.image_spans):
                if cfg.on_image_truncation == "drop":
                    report.add(conv.source, conv.index, "too_long_image_cut",
                               f"{len(enc.input_ids)} tokens > max_length {cut} and the cut would drop image tokens")
                    continue
            else:
                enc.input_ids, enc.labels = enc.input_ids[:cut], enc.labels[:cut]
        if all(label == -100 for label in enc.labels[1:]):
            report.add(conv.source, conv.index, "no_trained_tokens", "no assistant tokens left to train on")
            continue
        kept_c.append(conv)
        kept_e.append(enc)
    return kept_c, kept_e


def _bad(cfg: VLMDataConfig, report: Any, conv: Any, reason: str, message: str) -> None:
    if cfg.on_bad_record == "error":
        raise DataError(f"{conv.source}: record {conv.index}: {message}", source=conv.source, index=conv.index, reason=reason)
    report.add(conv.source, conv.index, reason, message)


@DATA.register("vlm")
class VLMDataFactory(DataFactory):
    """LLaVA json/jsonl, messages JSONL, dense-caption JSONL and `save_to_disk` datasets, mixed by weight."""

    config_class = VLMDataConfig

    def encoder(self, model_bundle: Any) -> Any:
        from arctic_vl.data.encoding import SampleEncoder

        c = self.config
        return SampleEncoder(model_bundle.processor, model_bundle.family, min_pixels=c.min_pixels,
                             max_pixels=c.max_pixels, image_grid_pinpoints=c.image_grid_pinpoints,
                             system_prompt=c.system_prompt)

    def read(self, specs: list[Any], *, seed: int, report: Any) -> list[Any]:
        from arctic_vl.data.sources import SourceSpec, read_sources

        specs = [s if isinstance(s, SourceSpec) else SourceSpec(path=s) for s in specs]
        return read_sources(specs, base_dir=Path.cwd(), seed=seed, on_bad_record=self.config.on_bad_record, report=report)

    def dataset(self, specs: list[Any], encoder: Any, *, seed: int, report: Any) -> VLMDataset:
        convs, encoded = scan(self.read(specs, seed=seed, report=report), encoder, self.config, report)
        if not encoded:
            raise DataError(f"no usable samples in {', '.join(str(getattr(s, 'path', s)) for s in specs)}"
                            f"{': ' + report.format() if report.total else ''}")
        return VLMDataset(convs, encoded, encoder, self.config.blank_images)

    def build(self, model_bundle: Any, *, seed: int) -> DataBundle:
        from arctic_vl.data.sources import BadRecordReport

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

    def _packed_bundle(self, model_bundle: Any, encoder: Any, train: VLMDataset, evaluation: VLMDataset | None,
                       report: Any, stats: dict[str, Any], seed: int) -> DataBundle:
        """Packing: a best-fit planner as the bundle's batcher and the packed collator."""
        from arctic_vl.data.packing import PackedCollator, PackingPlanner, RopeIndex

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

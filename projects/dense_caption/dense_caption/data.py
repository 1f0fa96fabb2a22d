"""`dense_caption` data factory: dense-caption records, augmented and encoded per item in the DataLoader workers.

Up front (main process): read the sources through the core (`VLMDataFactory.read`: formats, sampling, weights,
bad-record policy), check every dense record (one image whose header size equals `width` x `height`, a
`summary` when summary mode can be drawn) and encode it once un-augmented, to apply `max_length` and to fail
fast on records the encoder refuses. Records of other formats (LLaVA, messages: e.g. Stage-B verdict chats)
are passed through as they are.

Per item (worker): the epoch's grouping (`images_per_sample`), the group's mode (dense or summary, drawn with
an RNG seeded by (seed, epoch, group)), each record's augmentation (seeded by (seed, epoch, record)), the
answer rendered from the augmented geometry in the family's coordinates, the encoding, and the health checks
(image placeholders = images given, vision grid = pixel values, labels = exactly the answer). Everything an
item holds is a function of (seed, epoch, index), so workers, ranks and a resumed run agree, and the batch
plan (which needs only the number of items) is deterministic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from loguru import logger
from pydantic import Field, model_validator

from arctic_vl import (
    DATA,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    ITEM_BAD,
    ITEM_INDEX,
    UNREADABLE_IMAGE,
    Collator,
    DataBundle,
    DataError,
    VLMDataConfig,
    VLMDataFactory,
    epoch_seed,
    image_size,
    open_image,
    prompt_item,
)

from .answers import image_key, render_answer, render_object
from .augment import AugmentationConfig, Augmenter, Result, Telemetry
from .coords import AnswerCoords, answer_coords
from .geometry import Geometry, bounds, object_geometry

DENSE_PROMPT = "Describe every object with its location."
SUMMARY_PROMPT = "Summarise the image in one line."
#: salts of the per-epoch draws (independent streams for grouping, modes and augmentation)
_GROUP_SALT, _MODE_SALT = 0x6770, 0x6D6F
#: reasons a dense record is skipped (counted) under on_bad_record: skip
MISSING_SUMMARY = "missing_summary"
IMAGE_SIZE_MISMATCH = "image_size_mismatch"
IMAGES_PER_RECORD = "images_per_record"
TOO_LONG = "too_long"
#: bookkeeping key of a sample / batch: augmentation counts (never a model input)
AUGMENTATION_KEY = "_augmentation"


class DenseCaptionDataConfig(VLMDataConfig):
    """The `data:` section of `dense_caption`: the core VLM data options (packing must stay off) plus
    augmentation, answer coordinates, summary mode, multi-image grouping, prompts and object order."""

    type: str = "dense_caption"
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig,
                                             description="geometry-aware augmentation of training samples")
    coords: Literal["auto", "norm1000", "pixels"] = Field(
        "auto", description="answer coordinates: norm1000 (0 to 1000), pixels of the image the model sees, or auto "
                            "(pixels for qwen2_5_vl, norm1000 otherwise)")
    summary_ratio: float = Field(0.0, ge=0, le=1, description="share of training groups in summary mode "
                                 "(needs a summary on every record)")
    images_per_sample: int = Field(1, ge=1, description="records grouped into one multi-image sample (per epoch, "
                                   "seeded); the answer is then keyed per image")
    image_key_prefix: str = Field("image_", min_length=1, description="keys of a multi-image answer: "
                                  "image_1, image_2, ...")
    answer_format: Literal["list", "keyed"] = Field(
        "list", description="an image's objects in the answer: list (a JSON list, the October documents) or keyed "
                            "({\"object_1\": {...}, \"object_2\": {...}}, the November documents)")
    dense_prompt: str = Field(DENSE_PROMPT, min_length=1)
    summary_prompt: str = Field(SUMMARY_PROMPT, min_length=1)
    dense_system_prompt: str | None = Field(None, description="system turn of dense samples (default: system_prompt)")
    summary_system_prompt: str | None = Field(None, description="system turn of summary samples "
                                              "(default: system_prompt)")
    object_order: Literal["reading", "record"] = Field(
        "reading", description="order of objects in the answer: reading (top edge, then left edge, of the "
                               "augmented geometry) or record (as the record lists them)")
    health_checks: bool = Field(True, description="per item: placeholders = images, vision grid = pixels, "
                                "labels = the answer (errors name the record)")

    @model_validator(mode="after")
    def _no_packing(self) -> DenseCaptionDataConfig:
        if self.packing:
            raise ValueError("packing: the dense_caption factory encodes each item in the workers (its answer "
                             "changes with the augmentation), so packed rows cannot be planned from fixed lengths; "
                             "set packing: false")
        return self


@dataclass
class DenseRecord:
    """One checked dense-caption record: its image, size, objects (pixel geometry, desc) and summary."""

    image: Any
    width: int
    height: int
    objects: list[tuple[Geometry, str]]
    summary: str | None
    source: str
    index: int
    meta: dict[str, Any] = field(default_factory=dict)
    line: int | None = None

    @property
    def where(self) -> str:
        """`file: record N (line L)` (the line where the file has lines), for messages."""
        return f"{self.source}: record {self.index}" + (f" (line {self.line})" if self.line is not None else "")


@dataclass
class Target:
    """What one dense item was built from: per image its ground-truth objects (pixels) and answer convention."""

    records: list[int]
    mode: str
    objects: list[list[tuple[Geometry, str]]]
    coords: list[AnswerCoords]
    answer: str


class UnreadablePixels(Exception):
    """A record whose image did not decode while its item was built (in a DataLoader worker)."""

    def __init__(self, source: str, index: int, where: str, error: DataError):
        super().__init__(str(error))
        self.source, self.index, self.where, self.error = source, index, where, error

    def tag(self) -> tuple[str, int, str, str]:
        """What the item carries under ITEM_BAD for `DataBundle.accept`: (source, index, reason, message)."""
        reason = self.error.reason or UNREADABLE_IMAGE
        return (self.source, self.index, reason,
                f"{self.where}: {self.error} [reason: {reason}; found when loading the sample]")


def _load(ref: Any, source: str, index: int, where: str) -> Any:
    try:
        return open_image(ref)
    except DataError as e:
        raise UnreadablePixels(source, index, where, e) from None


def _sort_reading(objects: list[dict[str, Any]], geoms: list[Geometry]) -> list[dict[str, Any]]:
    keyed = sorted(zip(objects, geoms), key=lambda t: (bounds(t[1])[1], bounds(t[1])[0]))
    return [o for o, _ in keyed]


class DenseCaptionDataset(torch.utils.data.Dataset):
    """Dense groups (indices 0 .. n_groups-1), then pass-through conversations; items built on access."""

    def __init__(self, records: list[DenseRecord], plain: list[Any], encoder: Any, family: Any,
                 config: DenseCaptionDataConfig, seed: int, *, train: bool):
        self.records, self.plain = records, plain
        self.encoder, self.family, self.config = encoder, family, config
        self.seed, self.train = seed, train
        self.epoch = 0
        self.augmenter = Augmenter(config.augmentation if train else AugmentationConfig())
        k = config.images_per_sample
        self.n_groups = (len(records) + k - 1) // k
        self.lengths: list[int] = []  # un-augmented tokens per item (stats only), set by the factory

    # ------------------------------------------------------------------------------------ epoch draws
    def set_epoch(self, epoch: int) -> None:
        """The epoch whose grouping, modes and augmentation the items use (the loop sets it before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_groups + len(self.plain)

    def group(self, i: int) -> list[int]:
        """Record indices of dense group `i` this epoch (a seeded permutation chunked; eval: file order)."""
        k = self.config.images_per_sample
        if k == 1:
            return [i]
        n = len(self.records)
        order = np.arange(n)
        if self.train:
            order = np.random.default_rng([epoch_seed(self.seed, self.epoch), _GROUP_SALT]).permutation(n)
        return [int(r) for r in order[i * k:(i + 1) * k]]

    def mode(self, i: int) -> str:
        """`dense` or `summary` for group `i` this epoch (eval items are always dense)."""
        ratio = self.config.summary_ratio
        if not self.train or ratio <= 0:
            return "dense"
        rng = np.random.default_rng([epoch_seed(self.seed, self.epoch), _MODE_SALT, i])
        return "summary" if rng.random() < ratio else "dense"

    # ------------------------------------------------------------------------------------------ items
    def target(self, i: int, *, with_pixels: bool = True) -> tuple[Target, list[Any], Telemetry]:
        """Group `i`'s answer and ground truth (after augmentation) and its images (None without pixels)."""
        cfg = self.config
        mode = self.mode(i)
        records = self.group(i)
        seed = epoch_seed(self.seed, self.epoch)
        tele = Telemetry()
        images, values, objects, coords = [], [], [], []
        for r in records:
            rec = self.records[r]
            image = _load(rec.image, rec.source, rec.index, rec.where) if with_pixels else None
            res: Result = self.augmenter(rec.width, rec.height, rec.objects, seed=seed, index=r, image=image)
            if self.augmenter.active:
                tele.add(res, len(rec.objects))
            if with_pixels and cfg.blank_images:
                from PIL import Image

                res.image = Image.new("RGB", (res.width, res.height), (127, 127, 127))
            images.append(res.image)
            conv = answer_coords(cfg.coords, self.family, self.encoder.processor, res.width, res.height)
            coords.append(conv)
            objects.append([(it.geom, it.desc) for it in res.items])
            if mode == "summary":
                values.append(rec.summary)
                continue
            rendered, geoms = [], []
            for it in res.items:
                obj = render_object(it.geom, it.desc, conv)
                if obj is None:
                    tele.counts["dropped_by_rounding"] += 1
                    continue
                rendered.append(obj)
                geoms.append(it.geom)
            values.append(_sort_reading(rendered, geoms) if cfg.object_order == "reading" else rendered)
        answer = render_answer(values, cfg.image_key_prefix, cfg.answer_format)
        return Target(records, mode, objects, coords, answer), images, tele

    def messages(self, target: Target) -> list[dict[str, str]]:
        """The chat of one item: optional system turn, images + prompt, the answer."""
        cfg = self.config
        dense = target.mode == "dense"
        system = (cfg.dense_system_prompt if dense else cfg.summary_system_prompt) or cfg.system_prompt
        prompt = cfg.dense_prompt if dense else cfg.summary_prompt
        out = [{"role": "system", "content": system}] if system else []
        out.append({"role": "user", "content": IMAGE_TOKEN * len(target.records) + prompt})
        out.append({"role": "assistant", "content": target.answer})
        return out

    def where(self, i: int) -> str:
        """The record(s) behind item `i`, for messages."""
        if i < self.n_groups:
            return "; ".join(self.records[r].where for r in self.group(i))
        conv = self.plain[i - self.n_groups]
        return f"{conv.source}: {conv.where}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item `index` (-1: a padding item); one whose image does not decode comes back tagged ITEM_BAD (the
        collator drops it, the loop applies on_bad_record), the same in every epoch, worker, rank and resume."""
        padding = index == -1  # a rank's padding sample (see arctic_vl's batch plan): trains nothing
        i = 0 if padding else int(index)
        try:
            item = self._dense_item(i) if i < self.n_groups else self._plain_item(i - self.n_groups)
        except UnreadablePixels as bad:
            return {ITEM_BAD: bad.tag(), ITEM_INDEX: index}
        except DataError as e:
            raise DataError(f"{self.where(i)}: {e}", source=e.source, index=e.index, reason=e.reason) from None
        if padding:
            item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
            item[AUGMENTATION_KEY] = {}
        item[ITEM_INDEX] = index
        return item

    def _dense_item(self, i: int) -> dict[str, Any]:
        target, images, tele = self.target(i)
        enc = self.encoder.encode_text(self.messages(target), [im.size for im in images])
        vision = self.encoder.encode_images(images)
        if self.config.health_checks:
            check_item(self.encoder, enc, vision, target.answer, len(images))
        limit = self.config.max_length
        if limit is not None and len(enc.input_ids) > limit:
            tele.counts["over_max_length"] += 1  # kept whole: cutting would break the JSON answer
        return {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long), **vision,
                AUGMENTATION_KEY: dict(tele.counts)}

    def _plain_item(self, j: int) -> dict[str, Any]:
        conv = self.plain[j]
        where = f"{conv.source}: {conv.where}"
        images = [_load(ref, conv.source, conv.index, where) for ref in conv.images]
        enc = self.encoder.encode_conversation(conv, [im.size for im in images])
        vision = self.encoder.encode_images(images) if images else {}
        return {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long), **vision, AUGMENTATION_KEY: {}}

    # ---------------------------------------------------------------------------------- generation
    def prompt_item(self, i: int) -> tuple[dict[str, Any], Target | None]:
        """Item `i` cut before its answer (for generation) and what it should answer; (the ITEM_BAD-tagged
        item, None) when an image does not decode."""
        try:
            target, images, _ = self.target(i)
        except UnreadablePixels as bad:
            return {ITEM_BAD: bad.tag(), ITEM_INDEX: i}, None
        enc = self.encoder.encode_text(self.messages(target), [im.size for im in images])
        item = prompt_item({"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                            "labels": torch.tensor(enc.labels, dtype=torch.long), **self.encoder.encode_images(images),
                            ITEM_INDEX: i})
        return item, target


def check_item(encoder: Any, enc: Any, vision: dict[str, torch.Tensor], answer: str, n_images: int) -> None:
    """Health checks of one encoded item; DataError (reason `health_check`) when one fails."""
    spans = enc.image_spans
    if len(spans) != n_images:
        raise DataError(f"health check: {len(spans)} image placeholders for {n_images} images", reason="health_check")
    grid = vision.get("image_grid_thw")
    if grid is not None:  # Qwen: one grid row per image; patches = sum t*h*w; tokens = t*h*w / merge^2
        merge = int(getattr(encoder.processor.image_processor, "merge_size", 2))
        patches = int(grid.prod(dim=-1).sum())
        if grid.shape[0] != n_images or vision["pixel_values"].shape[0] != patches:
            raise DataError(f"health check: image_grid_thw {grid.tolist()} does not match pixel_values "
                            f"{tuple(vision['pixel_values'].shape)} for {n_images} images", reason="health_check")
        for (start, end), row in zip(spans, grid.tolist()):
            if end - start != row[0] * row[1] * row[2] // merge**2:
                raise DataError(f"health check: {end - start} placeholder tokens for an image of grid {row}",
                                reason="health_check")
    elif "pixel_values" in vision and vision["pixel_values"].shape[0] != n_images:
        raise DataError(f"health check: pixel_values for {vision['pixel_values'].shape[0]} images, {n_images} given",
                        reason="health_check")
    tok = encoder.tokenizer
    trained = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])
    if not trained.startswith(answer) or trained[len(answer):].strip() not in tok.all_special_tokens:
        raise DataError(f"health check: the trained tokens {trained[:120]!r} are not exactly the answer "
                        f"{answer[:120]!r} plus its end-of-turn token", reason="health_check")


@DATA.register("dense_caption")
class DenseCaptionDataFactory(VLMDataFactory):
    """Dense-caption records (plus any other format, passed through), augmented and encoded per item."""

    config_class = DenseCaptionDataConfig
    config: DenseCaptionDataConfig

    def records(self, convs: list[Any], *, train: bool, report: Any) -> tuple[list[DenseRecord], list[Any]]:
        """Split conversations into checked dense records and pass-through conversations."""
        dense, plain = [], []
        need_summary = train and self.config.summary_ratio > 0
        for conv in convs:
            meta = conv.meta
            if "objects" not in meta or "width" not in meta:
                plain.append(conv)
                continue
            problem = None
            if len(conv.images) != 1:
                problem = (IMAGES_PER_RECORD, f"a dense-caption record describes one image, got {len(conv.images)} "
                           "(group records into multi-image samples with images_per_sample)")
            elif image_size(conv.images[0]) != (meta["width"], meta["height"]):
                problem = (IMAGE_SIZE_MISMATCH, f"width x height {meta['width']} x {meta['height']} but the image "
                           f"{conv.images[0]} is {'x'.join(map(str, image_size(conv.images[0])))}")
            elif need_summary and not (isinstance(meta.get("summary"), str) and meta["summary"].strip()):
                problem = (MISSING_SUMMARY, f"summary_ratio {self.config.summary_ratio} draws summary mode, which "
                           "needs a non-empty `summary` on every record (add one, or set summary_ratio: 0)")
            if problem is not None:
                self._bad(conv, *problem, report)
                continue
            objects = [(object_geometry(o), o["desc"]) for o in meta["objects"]]
            extra = {k: v for k, v in meta.items() if k not in ("objects", "width", "height", "summary")}
            dense.append(DenseRecord(conv.images[0], meta["width"], meta["height"], objects, meta.get("summary"),
                                     conv.source, conv.index, extra, conv.line))
        return dense, plain

    def _bad(self, conv: Any, reason: str, message: str, report: Any) -> None:
        text = f"{conv.source}: {conv.where}: {message} [reason: {reason}]"
        if self.config.on_bad_record == "error":
            raise DataError(text + " (on_bad_record='skip' drops such records and counts them)",
                            source=conv.source, index=conv.index, reason=reason)
        report.add(conv.source, conv.index, reason, text)

    def dense_dataset(self, specs: list[Any], encoder: Any, family: Any, *, seed: int, report: Any,
                      train: bool, fingerprints: dict[str, Any] | None = None) -> DenseCaptionDataset:
        """Read, check and scan one split (`fingerprints` gets each source's); the dataset builds its items on
        access."""
        convs = self.read(specs, seed=seed, report=report, fingerprints=fingerprints)
        dense, plain = self.records(convs, train=train, report=report)
        # Scan: each record's un-augmented dense answer, for max_length and the stats. The chat around the answer
        # depends only on the image size, so one full encode per size gives it; the answers are tokenized in one
        # batch (the exact per-item encoding, with its health checks, happens in the workers).
        probe = DenseCaptionDataset(dense, [], encoder, family, self.config.model_copy(
            update={"images_per_sample": 1, "summary_ratio": 0.0}), seed, train=False)
        answers = [probe.target(r, with_pixels=False)[0].answer for r in range(len(dense))]
        answer_tokens = encoder.tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
        overhead: dict[tuple[int, int], int] = {}
        keep, lengths = [], []
        for r, rec in enumerate(dense):
            size = (rec.width, rec.height)
            if size not in overhead:
                try:
                    target, _, _ = probe.target(r, with_pixels=False)
                    enc = encoder.encode_text(probe.messages(target), [size])
                except DataError as e:
                    self._bad_record(rec, e.reason or "invalid_record", str(e), report)
                    continue
                overhead[size] = len(enc.input_ids) - len(answer_tokens[r])
            n = overhead[size] + len(answer_tokens[r])
            limit = self.config.max_length
            if limit is not None and n > limit:
                self._bad_record(rec, TOO_LONG, f"{n} tokens > max_length {limit} (a dense answer is never cut: "
                                 "the JSON would break)", report, always_skip=True)
                continue
            keep.append(rec)
            lengths.append(n)
        plain_kept = []
        for conv in plain:
            try:
                enc = encoder.encode_conversation(conv, [image_size(ref) for ref in conv.images])
            except DataError as e:
                self._bad(conv, e.reason or "invalid_record", str(e), report)
                continue
            if self.config.max_length is not None and len(enc.input_ids) > self.config.max_length:
                report.add(conv.source, conv.index, TOO_LONG, f"{conv.source}: {conv.where}: "
                           f"{len(enc.input_ids)} tokens > max_length {self.config.max_length}")
                continue
            plain_kept.append(conv)
            lengths.append(len(enc.input_ids))
        if not keep and not plain_kept:
            raise DataError(f"no usable samples in {', '.join(str(getattr(s, 'path', s)) for s in specs)}"
                            f"{': ' + report.format() if report.total else ''}")
        ds = DenseCaptionDataset(keep, plain_kept, encoder, family, self.config, seed, train=train)
        ds.lengths = lengths
        return ds

    def _bad_record(self, rec: DenseRecord, reason: str, message: str, report: Any, always_skip: bool = False) -> None:
        text = f"{rec.where}: {message} [reason: {reason}]"
        if self.config.on_bad_record == "error" and not always_skip:
            raise DataError(text, source=rec.source, index=rec.index, reason=reason)
        report.add(rec.source, rec.index, reason, text)

    def build(self, model_bundle: Any, *, seed: int) -> DataBundle:
        """Dense train (and eval) datasets, the `DenseCollator`, the bad-record report, stats and the data
        fingerprint; raises `DataError` on a bad record when `on_bad_record` is error."""
        from arctic_vl import BadRecordReport

        report = BadRecordReport()
        encoder = self.encoder(model_bundle)
        family = model_bundle.family
        fingerprint: dict[str, Any] = {}  # saved with checkpoints: a resume on changed data is refused
        train = self.dense_dataset(self.config.sources, encoder, family, seed=seed, report=report, train=True,
                                   fingerprints=fingerprint)
        evaluation = None
        if self.config.eval_sources:
            evaluation = self.dense_dataset(self.config.eval_sources, encoder, family, seed=seed, report=report,
                                            train=False)
        if report.total:
            logger.warning(f"skipped {report.total} records: {report.format()}")
        stats = {"train_samples": len(train), "train_records": len(train.records), "pass_through": len(train.plain),
                 "eval_samples": len(evaluation) if evaluation else 0, "train_tokens": sum(train.lengths),
                 "skipped": report.by_reason(), "augmentation": train.augmenter.active}
        return DataBundle(train=train, eval=evaluation, collate=DenseCollator(encoder), report=report, stats=stats,
                          micro_batch_size=self.config.micro_batch_size, shuffle=self.config.shuffle,
                          num_workers=self.config.num_workers, fingerprint=fingerprint,
                          on_bad_record=self.config.on_bad_record)


class DenseCollator:
    """The core's collator, plus the batch's summed augmentation counts under `_augmentation`."""

    def __init__(self, encoder: Any):
        self.inner = Collator(encoder)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The core batch of `samples`, with their augmentation counts summed under `_augmentation`."""
        counts: Counter[str] = Counter()
        for s in samples:
            counts.update(s.pop(AUGMENTATION_KEY, {}) or {})
        batch = self.inner(samples)
        batch[AUGMENTATION_KEY] = dict(counts)
        return batch


__all__ = ["DenseCaptionDataConfig", "DenseCaptionDataFactory", "DenseCaptionDataset", "DenseCollator",
           "DenseRecord", "Target", "check_item", "image_key"]

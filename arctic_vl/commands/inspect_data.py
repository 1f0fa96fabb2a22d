"""`arctic_vl inspect-data`: the items that train, built exactly as training builds them, with the data's counts.

The configured data factory's own `build` makes the data (every factory: the core's `vlm`, a project's, a
third party's), handed the bundle its model factory makes for it without weights where it can
(`ModelFactory.build_for_data`), on no process group. The items shown are the first of the epoch's batch plan
of a one-process run, in the loop's order (`DataBundle.plan`), after the dataset's own per-epoch work
(augmentation, grouping, modes): the same items the training loader yields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arctic_vl.batchkit import render_tokens
from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.data.collate import ITEM_BAD, ITEM_INDEX, ITEM_ROW
from arctic_vl.data.sampling import PADDING_INDEX
from arctic_vl.engine import Engine


@dataclass
class InspectedItem:
    """One training item as the loader yields it: its dataset key, the record(s) behind it, tokens and labels
    (empty for an item whose pixels did not decode; `bad` then says why)."""

    key: Any
    where: str
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    bad: str | None = None


@dataclass
class Inspection:
    """What `inspect-data` found: the report's lines and the items shown."""

    lines: list[str]
    items: list[InspectedItem]

    @property
    def text(self) -> str:
        """The report as printed."""
        return "\n".join(self.lines)


def _where(dataset: Any, index: int) -> str:
    """The record(s) behind sample `index`: the dataset's own `where`, else its conversation's."""
    if callable(getattr(dataset, "where", None)):
        return str(dataset.where(index))
    convs = getattr(dataset, "conversations", None)
    if convs is not None and 0 <= index < len(convs):
        return f"{convs[index].source} {convs[index].where}"
    return f"item {index}"


def _counts(split: str, dataset: Any) -> str:
    """`split: N samples (I with images, T text-only), X tokens, Y trained tokens`, as far as the dataset tells."""
    n = len(dataset)
    text = f"{split}: {n} samples"
    convs, encoded = getattr(dataset, "conversations", None), getattr(dataset, "encoded", None)
    if convs is not None and len(convs) == n:
        with_images = sum(1 for c in convs if c.images)
        text += f" ({with_images} with images, {n - with_images} text-only)"
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None and len(lengths) == n:
        # a factory that builds items per epoch (augmentation) measures them once, un-augmented
        text += f", {sum(lengths)} tokens" + ("" if encoded is not None else " (as first encoded)")
    if encoded is not None and len(encoded) == n:
        text += f", {sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in encoded)} trained tokens"
    return text


def _notes(item: dict[str, Any]) -> str:
    """An item's own small bookkeeping values (e.g. its augmentation counts), for its header line."""
    notes = [f"{k.lstrip('_')} {json.dumps(v, default=str)}" for k, v in item.items()
             if k.startswith("_") and k not in (ITEM_INDEX, ITEM_ROW, ITEM_BAD)
             and isinstance(v, dict | int | float | str)]
    return "".join(f", {n}" for n in notes)


def inspect(config: Any, overrides: list[str] | tuple[str, ...] = (), n: int = 1, epoch: int = 0) -> Inspection:
    """Build the run's data with its data factory and show the first `n` items of `epoch` in training order.

    Lines: the model, per split its counts, the skipped records by reason (the build's report), the data
    stats, a warning when the chat template trains no end-of-turn token, then each item's header (the
    record(s) behind it, tokens, images) and its tokens with the trained ones in [[...]].
    """
    from arctic_vl.data.encoding import unended_warning

    engine = Engine(config, overrides)
    seed = engine.config.trainer.seed
    model_factory = engine.model_factory()
    model_factory.prepare(engine.output_dir, seed)
    bundle = model_factory.build_for_data(engine.output_dir)
    data = engine.data_factory().build(bundle, seed=seed)
    lines = [f"model: {engine.describe_model()}"]
    for split, dataset in (("train", data.train), ("eval", data.eval)):
        if dataset is not None:
            lines.append(_counts(split, dataset))
    report = data.report
    total = report.total if report is not None else 0
    lines.append(f"skipped {total}" + (f" ({report.format()})" if total else ""))
    stats = {k: v for k, v in data.stats.items() if k not in ("cache", "skipped")}
    if stats:
        lines.append(f"stats: {json.dumps(stats, default=str)}")
    train = data.train
    encoder = getattr(train, "encoder", None)
    if encoder is not None and getattr(train, "encoded", None) is not None:
        warning = unended_warning(encoder, train.conversations, train.encoded)
        if warning:
            lines.append(f"warning: {warning}")

    tokenizer = getattr(bundle.processor, "tokenizer", bundle.processor)
    family = bundle.family
    image_ids = {tokenizer.convert_tokens_to_ids(family.image_token)} if family is not None else set()
    if hasattr(train, "set_epoch"):  # as the loop sets it before each epoch
        train.set_epoch(epoch)
    keys = [key for micro in data.plan(epoch, 1, seed) for key in micro[0]]
    items = []
    for key in keys:
        if len(items) >= n:
            break
        index = key[1] if isinstance(key, tuple) else key  # a packing plan's (row, sample) key
        if index == PADDING_INDEX:
            continue
        item = train[key]
        where = _where(train, index)
        if ITEM_BAD in item:  # pixels that do not decode: the loop applies on_bad_record to it
            items.append(InspectedItem(key, where, bad=item[ITEM_BAD][3]))
            lines.append(f"--- {where}: not trained: {item[ITEM_BAD][3]}")
            continue
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        items.append(InspectedItem(key, where, ids, labels))
        convs = getattr(train, "conversations", None)
        names = ", ".join(Path(str(r)).name for r in convs[index].images) if convs is not None else ""
        lines.append(f"--- {where}: {len(ids)} tokens" + (f", images: {names}" if names else "") + _notes(item))
        lines.append(render_tokens(tokenizer, ids, labels, image_ids))
    return Inspection(lines, items)


def inspect_data(config: str, overrides: list[str], n: int = 1, epoch: int = 0) -> str:
    """What `arctic_vl inspect-data CONFIG` prints (see `inspect`)."""
    return inspect(config, overrides, n=n, epoch=epoch).text

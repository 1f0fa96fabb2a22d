"""Data sources: read record files into `Conversation`s, sample, weight and mix them; apply the
bad-record policy.

A source is a LLaVA json/jsonl file, a messages JSONL, a dense-caption JSONL, a `save_to_disk`
directory, or a YAML list of files (LLaVA-OneVision style). Everything is deterministic for a seed:
each random choice uses its own `random.Random` salted with the source path as written in the config,
so moving the data directory or adding another source does not change what a source contributes.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from arctic_vl.config.paths import ExistingPath as ConfigPath  # data files must exist at validation
from arctic_vl.data.images import DatasetImage, ImageBytes, ImageRef, image_size
from arctic_vl.data.records import (
    CONVERTERS,
    INVALID_JSON,
    MALFORMED_RECORD,
    BadRecord,
    Conversation,
    detect_record_format,
)
from arctic_vl.errors import ConfigError, DataError

OnBadRecord = Literal["error", "skip"]
RECORD_FORMATS = ("llava", "messages", "dense_caption")
YAML_SUFFIXES = (".yaml", ".yml")
YAML_ENTRY_KEYS = ("json_path", "sampling_strategy")
_DETECT_SCAN = 100  # records looked at to auto-detect a format (the first ones may be bad records)


def parse_sample(s: str) -> tuple[str, int | None]:
    """`all` -> ("all", None); `first:N` / `random:N` (N >= 1) -> (mode, N); anything else ConfigError."""
    if s == "all":
        return "all", None
    mode, sep, num = s.partition(":")
    if sep and mode in ("first", "random") and num.isdigit() and int(num) >= 1:
        return mode, int(num)
    raise ConfigError(f"sample {s!r} is not one of: all, first:N, random:N (N a positive integer)")


class SourceSpec(pydantic.BaseModel, extra="forbid"):
    """One entry of a data config's `sources` list."""

    path: ConfigPath  # resolved against the config file that names it
    format: Literal["auto", "llava", "messages", "dense_caption", "hf_disk"] = "auto"
    sample: str = "all"
    weight: float = pydantic.Field(1.0, gt=0)
    image_root: ConfigPath | None = None

    @pydantic.field_validator("sample")
    @classmethod
    def _check_sample(cls, v: str) -> str:
        try:
            parse_sample(v)
        except ConfigError as e:  # pydantic reports ValueError with the field path
            raise ValueError(str(e)) from None
        return v


class BadRecordReport:
    """Counts records skipped under on_bad_record="skip", by reason and by source, with a few examples."""

    def __init__(self, max_examples: int = 3):
        self.max_examples = max_examples  # per reason
        self.counts: Counter[tuple[str, str]] = Counter()  # (source, reason) -> count
        self.examples: list[tuple[str, int | None, str, str]] = []  # (source, index, reason, message)

    def add(self, source: str, index: int | None, reason: str, message: str) -> None:
        """Count one skipped record; keep its message if its reason has few examples yet."""
        self.counts[(source, reason)] += 1
        if sum(1 for e in self.examples if e[2] == reason) < self.max_examples:
            self.examples.append((source, index, reason, message))

    @property
    def total(self) -> int:
        """The number of skipped records."""
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, int]:
        """Skipped records per reason, reasons sorted by name."""
        out: Counter[str] = Counter()
        for (_, reason), c in self.counts.items():
            out[reason] += c
        return dict(sorted(out.items()))

    def by_source(self) -> dict[str, int]:
        """Skipped records per source file, sorted by path."""
        out: Counter[str] = Counter()
        for (source, _), c in self.counts.items():
            out[source] += c
        return dict(sorted(out.items()))

    def merge(self, other: BadRecordReport) -> None:
        """Add another report's counts and examples (e.g. gathered from other ranks)."""
        for (source, index, reason, message) in other.examples:
            if sum(1 for e in self.examples if e[2] == reason) < self.max_examples:
                self.examples.append((source, index, reason, message))
        self.counts.update(other.counts)

    def format(self) -> str:
        """A human summary: total, per reason, per source, then the kept examples."""
        if not self.total:
            return "no bad records"
        lines = [f"skipped {self.total} bad record{'s' if self.total != 1 else ''}:"]
        lines += [f"  {reason}: {c}" for reason, c in self.by_reason().items()]
        lines.append("by source:")
        lines += [f"  {source}: {c}" for source, c in self.by_source().items()]
        lines.append("examples:")
        lines += [f"  {m}" for (_, _, _, m) in self.examples]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"BadRecordReport(total={self.total}, by_reason={self.by_reason()})"


@dataclass
class _Raw:
    """A record as stored: `text` for a not-yet-parsed JSONL line, else the parsed `value`."""

    index: int
    line: int | None = None
    text: str | None = None
    value: Any = None


@dataclass
class _File:
    """One record file (or saved dataset) loaded but not yet converted."""

    path: Path
    record_format: str
    raws: list[_Raw]
    image_dir: Path  # relative image paths are resolved against this


def _resolve_path(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _parse(raw: _Raw) -> Any:
    if raw.text is None:
        return raw.value
    try:
        return json.loads(raw.text)
    except json.JSONDecodeError as e:
        raise BadRecord(INVALID_JSON, "<line>", f"not valid JSON ({e.msg} at column {e.colno})") from None


def _jsonl_raws(text: str) -> list[_Raw]:
    raws = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():  # blank lines are not records (trailing newlines, hand-edited files)
            raws.append(_Raw(index=len(raws), line=lineno, text=line))
    return raws


def _detect(path: Path, raws: list[_Raw]) -> str:
    for raw in raws[:_DETECT_SCAN]:
        try:
            fmt = detect_record_format(_parse(raw))
        except BadRecord:
            continue
        if fmt:
            return fmt
    raise ConfigError(f"{path}: cannot tell the record format from its first records (no 'conversations', "
                      f"'messages' or 'objects' field); set format: to one of {', '.join(RECORD_FORMATS)}")


def _load_json_file(path: Path, fmt: str, image_root: Path | None) -> _File:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})", source=str(path), reason=INVALID_JSON) from e
    if path.suffix == ".jsonl":
        raws = _jsonl_raws(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: a JSONL file named .json
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                                source=str(path), reason=INVALID_JSON) from None
            raws = _jsonl_raws(text)
        else:
            if isinstance(data, dict):
                data = [data]  # a single record
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json data file must hold a list of records, "
                                f"got {type(data).__name__}", source=str(path), reason=MALFORMED_RECORD)
            raws = [_Raw(index=i, value=v) for i, v in enumerate(data)]
    record_format = _detect(path, raws) if fmt == "auto" else fmt
    return _File(path, record_format, raws, image_root or path.parent)


def _image_columns(features: Any) -> dict[str, bool]:
    """Columns holding `datasets.Image` features -> whether the cell is a list of images."""
    import datasets

    out = {}
    for name, feat in features.items():
        if isinstance(feat, datasets.Image):
            out[name] = False
        elif isinstance(feat, datasets.List | datasets.Sequence | datasets.LargeList) and isinstance(
                getattr(feat, "feature", None), datasets.Image):
            out[name] = True
    return out


def _load_hf_disk(path: Path, fmt: str, image_root: Path | None) -> _File:
    import datasets
    import pyarrow.compute as pc

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not a directory written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ConfigError(f"{path}: a DatasetDict with splits {sorted(ds)}; point path at one split "
                              f"directory, e.g. {path / sorted(ds)[0]}")
        split = next(iter(ds))
        path, ds = path / split, ds[split]
    image_cols = _image_columns(ds.features)
    rows = ds.select_columns([c for c in ds.column_names if c not in image_cols]).to_list()
    table = ds.data
    for col, is_list in image_cols.items():
        column = table.column(col)
        nulls = column.is_null().to_pylist()
        lengths = pc.list_value_length(column).to_pylist() if is_list else None
        for row, record in enumerate(rows):
            if nulls[row]:
                record[col] = None
            elif is_list:
                record[col] = [DatasetImage(str(path), row, col, i) for i in range(lengths[row])]
            else:
                record[col] = DatasetImage(str(path), row, col)
    raws = [_Raw(index=i, value=r) for i, r in enumerate(rows)]
    if fmt in ("auto", "hf_disk"):
        fmt = _detect(path, raws)
    return _File(path, fmt, raws, image_root or path)


def _load_file(path: Path, fmt: str, image_root: Path | None) -> _File:
    if not path.exists():
        raise ConfigError(f"data source not found: {path}")
    if path.is_dir():
        if fmt not in ("auto", "hf_disk", *RECORD_FORMATS):
            raise ConfigError(f"{path}: a directory can only be a format: hf_disk source")
        return _load_hf_disk(path, fmt, image_root)
    if fmt == "hf_disk":
        raise ConfigError(f"{path}: format: hf_disk needs a directory written by datasets' save_to_disk")
    return _load_json_file(path, fmt, image_root)


def _to_ref(value: Any, field: str, image_dir: Path) -> ImageRef:
    """A raw image value (path string, {"bytes"|"path"} dict, or a ref already) as an ImageRef."""
    if isinstance(value, DatasetImage | ImageBytes):
        return value
    if isinstance(value, dict):  # the ms-swift / datasets {"bytes": ..., "path": ...} form
        if isinstance(value.get("bytes"), bytes):
            return ImageBytes(value["bytes"], name=str(value.get("path") or field))
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise BadRecord(MALFORMED_RECORD, field, f"an image must be a non-empty path string, got {value!r}")
    return str(_resolve_path(value, image_dir))


def _image_resolver(file: _File, check_images: bool) -> Callable[[Any, str], ImageRef]:
    """The callback converters use to turn a raw image value into a checked ImageRef."""

    def resolve(value: Any, field: str) -> ImageRef:
        ref = _to_ref(value, field, file.image_dir)
        if check_images:
            try:
                image_size(ref)
            except DataError as e:
                raise BadRecord(e.reason or MALFORMED_RECORD, field, str(e)) from None
        return ref

    return resolve


def _convert(file: _File, raw: _Raw, resolve: Callable[[Any, str], ImageRef], on_bad_record: OnBadRecord,
             report: BadRecordReport) -> Conversation | None:
    """The record as a Conversation, or None after counting it as bad (or raise, per the policy)."""
    try:
        messages, images, meta = CONVERTERS[file.record_format](_parse(raw), resolve)
    except BadRecord as e:
        where = f"record {raw.index}" + (f" (line {raw.line})" if raw.line is not None else "")
        message = (f"{file.path}: {where}: field {e.field}: {e.detail} "
                   f"[reason: {e.reason}; format: {file.record_format}]")
        if on_bad_record == "error":
            raise DataError(message + " (on_bad_record='skip' drops such records and counts them)",
                            source=str(file.path), index=raw.index, reason=e.reason) from None
        report.add(str(file.path), raw.index, e.reason, message)
        return None
    return Conversation(messages=messages, images=images, source=str(file.path), index=raw.index, meta=meta)


def _read_file(file: _File, sample: str, rng: random.Random, on_bad_record: OnBadRecord,
               report: BadRecordReport, check_images: bool) -> list[Conversation]:
    """Convert the sampled records. Sampling picks good records: `first:N` converts records in file
    order until N are good, `random:N` in a seeded random order; records never picked are never checked."""
    mode, n = parse_sample(sample)
    order: list[int] | range = range(len(file.raws))
    if mode == "random":
        order = rng.sample(range(len(file.raws)), len(file.raws))
    want = len(file.raws) if n is None else n
    resolve = _image_resolver(file, check_images)
    out = []
    for i in order:
        if len(out) >= want:
            break
        conv = _convert(file, file.raws[i], resolve, on_bad_record, report)
        if conv is not None:
            out.append(conv)
    if mode == "random":
        out.sort(key=lambda c: c.index)  # a subset in file order: easier to inspect, same content
    return out


def _yaml_entries(path: Path) -> list[tuple[Path, str]]:
    """The (file, sampling_strategy) entries of a LLaVA-OneVision style YAML list of files."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list):
        raise ConfigError(f"{path}: a YAML data source needs a top-level 'datasets:' list of "
                          "{json_path: ..., sampling_strategy: ...} entries")
    entries = []
    for i, entry in enumerate(doc["datasets"]):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise ConfigError(f"{where}: needs a 'json_path' string")
        unknown = sorted(set(entry) - set(YAML_ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(YAML_ENTRY_KEYS)}")
        strategy = str(entry.get("sampling_strategy", "all"))
        try:
            parse_sample(strategy)
        except ConfigError as e:
            raise ConfigError(f"{where}.sampling_strategy: {e}") from None
        entries.append((_resolve_path(entry["json_path"], path.parent), strategy))
    return entries


def _apply_weight(convs: list[Conversation], weight: float, rng: random.Random) -> list[Conversation]:
    """round(weight * n) records: whole copies for weight >= 1 plus a seeded random remainder."""
    n = len(convs)
    k = math.floor(weight * n + 0.5)  # half up: round() would send 2.5 to 2 but 3.5 to 4
    full, rest = divmod(k, n)
    picked = sorted(rng.sample(range(n), rest))
    return convs * full + [convs[i] for i in picked]


def read_source(spec: SourceSpec, *, base_dir: Path, seed: int, on_bad_record: OnBadRecord,
                report: BadRecordReport, check_images: bool = True) -> list[Conversation]:
    """Read, sample and weight one source. Relative paths resolve against `base_dir` (the config's
    directory). `check_images=False` skips the image header check (for huge, trusted datasets)."""
    path = _resolve_path(spec.path, Path(base_dir))
    image_root = _resolve_path(spec.image_root, Path(base_dir)) if spec.image_root else None
    salt = f"{seed}:{spec.path}"
    if path.suffix in YAML_SUFFIXES and path.is_file():
        convs = []
        for child, strategy in _yaml_entries(path):
            file = _load_file(child, spec.format, image_root)
            convs += _read_file(file, strategy, random.Random(f"{salt}:{child.name}"), on_bad_record,
                                report, check_images)
        mode, n = parse_sample(spec.sample)
        if mode == "first":
            convs = convs[:n]
        elif mode == "random" and n < len(convs):
            keep = sorted(random.Random(f"{salt}:sample").sample(range(len(convs)), n))
            convs = [convs[i] for i in keep]
    else:
        file = _load_file(path, spec.format, image_root)
        convs = _read_file(file, spec.sample, random.Random(f"{salt}:sample"), on_bad_record, report,
                           check_images)
    if not convs:
        raise DataError(f"{path}: no usable records ({report.total} bad records skipped in all sources so far)",
                        source=str(path), reason="empty_source")
    convs = _apply_weight(convs, spec.weight, random.Random(f"{salt}:weight"))
    if not convs:
        raise DataError(f"{path}: weight {spec.weight} leaves no records; raise the weight or drop the source",
                        source=str(path), reason="empty_source")
    return convs


def read_sources(specs: list[SourceSpec], *, base_dir: Path, seed: int, on_bad_record: OnBadRecord,
                 report: BadRecordReport, shuffle: bool = True, check_images: bool = True) -> list[Conversation]:
    """Read all sources and mix them: concatenated by weight, then a seeded shuffle (deterministic)."""
    if not specs:
        raise ConfigError("no data sources given")
    out: list[Conversation] = []
    for spec in specs:
        out += read_source(spec, base_dir=base_dir, seed=seed, on_bad_record=on_bad_record, report=report,
                           check_images=check_images)
    if shuffle:
        random.Random(f"{seed}:mix").shuffle(out)
    return out

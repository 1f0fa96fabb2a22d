"""Data sources: read record files into `Conversation`s, sample, weight and mix them; apply the
bad-record policy.

A source's path is read by a registered data source kind (`DATA_SOURCES`): a json/jsonl file of records,
a `save_to_disk` directory, or a YAML list of files (LLaVA-OneVision style); each record is converted by
a registered record format (`RECORD_FORMATS`: llava, messages, dense_caption, or a plugin's). Everything is
deterministic for a seed: each random choice uses its own `random.Random` salted with the source path as
written in the config, so moving the data directory or adding another source does not change what a
source contributes.
"""

from __future__ import annotations

import difflib
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pydantic

from arctic_vl.checkpoint.fingerprint import files_digest, images_digest
from arctic_vl.config.jsontext import BOM, JsonTextError, parse_json
from arctic_vl.config.loader import read_plain_yaml
from arctic_vl.config.paths import ExistingPath, resolve_user_path  # ExistingPath: data files exist at validation
from arctic_vl.data.bad_records import (
    BAD_RECORD_REASONS,
    INVALID_JSON,
    MALFORMED_RECORD,
    UNSUPPORTED_VIDEO,
    BadRecord,
    BadRecordReport,
    OnBadRecord,
    reject_record,
)
from arctic_vl.data.encoding import VIDEO_UNSUPPORTED, prepare_messages
from arctic_vl.data.images import DEFAULT_MAX_IMAGE_PIXELS, DatasetImage, ImageBytes, ImageRef, image_size
from arctic_vl.data.parallel import ordered_map
from arctic_vl.data.records import (
    Conversation,
    RecordFormat,
    detect_record_format,
    record_format,
    record_format_names,
)
from arctic_vl.errors import ConfigError, DataError
from arctic_vl.registry import DATA_SOURCES

T = TypeVar("T")
YAML_SUFFIXES = (".yaml", ".yml")
#: record fields that carry video (ms-swift `videos`, LLaVA-Video `video`): such a record is unsupported_video
VIDEO_FIELDS = ("videos", "video")
YAML_ENTRY_KEYS = ("json_path", "sampling_strategy")
_DETECT_SCAN = 100  # records looked at to auto-detect a format (the first ones may be bad records)
#: the most a source's weight may be, and the most records one source may contribute after weighting: a weight
#: of 1e9 on a small file would otherwise build a list of billions of records (a MemoryError, not an error)
MAX_WEIGHT = 10_000.0
MAX_WEIGHTED_RECORDS = 100_000_000


def parse_sample(s: str) -> tuple[str, int | None]:
    """`all` -> ("all", None); `first:N` / `random:N` (N >= 1) -> (mode, N); anything else ConfigError."""
    if s == "all":
        return "all", None
    mode, sep, num = s.partition(":")
    if sep and mode in ("first", "random") and num.isdigit() and int(num) >= 1:
        return mode, int(num)
    raise ConfigError(f"sample {s!r} is not one of: all, first:N, random:N (N a positive integer)")


def format_names() -> list[str]:
    """What a source's `format:` may say: auto, the registered record formats, the source kinds' own names."""
    kinds = [cls.format_name for _, cls in DATA_SOURCES.items() if cls.format_name]
    return ["auto", *record_format_names(), *kinds]


def _either(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


class SourceSpec(pydantic.BaseModel, extra="forbid"):
    """One entry of a data config's `sources` list."""

    path: ExistingPath  # resolved against the config file that names it
    format: str = pydantic.Field(
        "auto", description="auto (detect per file), a registered record format (llava, messages, dense_caption, "
                            "a plugin's) or hf_disk (a save_to_disk directory)")
    sample: str = "all"
    weight: float = pydantic.Field(1.0, gt=0,
                                   description=f"repeat (>1) or subsample (<1) the source's records; at most "
                                               f"{MAX_WEIGHT:g}, and at most {MAX_WEIGHTED_RECORDS} records after it")
    image_root: ExistingPath | None = None

    @pydantic.field_validator("format")
    @classmethod
    def _check_format(cls, v: str) -> str:
        allowed = format_names()
        if v not in allowed:
            close = difflib.get_close_matches(v, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown format {v!r}: should be {_either(allowed)} (auto-detection, a registered "
                             f"record format, or a source kind).{hint}")
        return v

    @pydantic.field_validator("weight")
    @classmethod
    def _check_weight(cls, v: float) -> float:
        if math.isfinite(v) and v > MAX_WEIGHT:  # inf / nan: the config's finite-number check names those
            raise ValueError(f"weight {v:g} is absurd: at most {MAX_WEIGHT:g} (a weight repeats the source's "
                             f"records that many times; a source may contribute at most {MAX_WEIGHTED_RECORDS} "
                             "records)")
        return v

    @pydantic.field_validator("sample")
    @classmethod
    def _check_sample(cls, v: str) -> str:
        try:
            parse_sample(v)
        except ConfigError as e:  # pydantic reports ValueError with the field path
            raise ValueError(str(e)) from None
        return v


# ------------------------------------------------------------------------------------------- source kinds


@dataclass
class RawRecord:
    """A record as stored: `text` for a not-yet-parsed JSONL line, else the parsed `value`.

    `index` counts the file's records from 0 (what messages and `Conversation.index` call the record);
    `line` is its 1-based line in a text file (None where records have no lines). `invalid` says why the stored
    bytes are no record at all (a line that is not UTF-8): the reader reports it as a bad record.
    """

    index: int
    line: int | None = None
    text: str | None = None
    value: Any = None
    invalid: str | None = None


@dataclass
class RecordFile:
    """One file (or saved dataset) of records, loaded but not yet converted.

    `record_format` names the registered format that converts its records; relative image paths resolve
    against `image_dir`. `sample` is None for the single file of a source (the source's `sample` applies);
    a source that lists files gives each its own strategy, and `salt` names the file's sampling RNG.
    """

    path: Path
    record_format: str
    raws: list[RawRecord]
    image_dir: Path
    sample: str | None = None
    salt: str | None = None


class DataSource:
    """Base of every data source kind (`@DATA_SOURCES.register("name")` on a subclass; no config class).

    Contract: the reader makes one instance (no arguments) and calls `claims(path)` on an existing path to
    find the kind that reads it (a `format:` equal to a kind's `format_name` picks that kind; otherwise the
    kinds that claim the path, a `fallback` kind only when no other does). Then `load(path, record_format,
    image_root)` returns the source's `RecordFile`s with their records unparsed, so that sampling checks only
    the records it picks. `record_format` is the source's `format:`; `self.resolve_format` turns it into a
    registered record format (detecting it for `auto`). A problem with the source itself (not one record)
    is a ConfigError or DataError naming the path.
    """

    #: the `format:` value that selects this kind explicitly (None: chosen only by `claims`)
    format_name: ClassVar[str | None] = None
    #: what the kind reads, for messages ("a json or jsonl file of records")
    description: ClassVar[str] = ""
    #: asked only when no other kind claims the path
    fallback: ClassVar[bool] = False
    registered_name: ClassVar[str] = ""

    def claims(self, path: Path) -> bool:
        """Whether this kind reads `path` (an existing file or directory)."""
        raise NotImplementedError

    def load(self, path: Path, record_format: str, image_root: Path | None) -> list[RecordFile]:
        """The record files of the source at `path`."""
        raise NotImplementedError

    def files(self, path: Path) -> list[Path]:
        """The files (or directories) whose bytes make the source: what the encoded-records cache hashes."""
        return [path]

    def resolve_format(self, path: Path, raws: list[RawRecord], record_format: str) -> str:
        """`record_format` as a registered record format: detected from the first records for `auto` (or this
        kind's `format_name`), else as given."""
        if record_format in ("auto", self.format_name):
            return _detect(path, raws)
        return record_format


DATA_SOURCES.bind_base(DataSource)


def source_kind(path: Path, requested_format: str) -> DataSource:
    """The data source kind that reads `path`; ConfigError when the path is missing or no kind reads it."""
    if not path.exists():
        raise ConfigError(f"data source not found: {path}")
    kinds = [cls() for _, cls in DATA_SOURCES.items()]
    for kind in kinds:
        if kind.format_name is not None and kind.format_name == requested_format:
            if not kind.claims(path):
                raise ConfigError(f"{path}: format: {requested_format} needs {kind.description}")
            return kind
    claiming = [k for k in kinds if k.claims(path)]
    chosen = [k for k in claiming if not k.fallback] or claiming
    if not chosen:
        known = "; ".join(f"{cls.registered_name}: {cls.description}" for _, cls in DATA_SOURCES.items())
        raise ConfigError(f"{path}: no data source kind reads it (registered: {known})")
    return chosen[0]


def _resolve_path(path: str, base: Path, where: str = "") -> Path:
    return resolve_user_path(path, base, where)


def _parse(raw: RawRecord) -> Any:
    if raw.invalid is not None:
        raise BadRecord(INVALID_JSON, "<line>", raw.invalid)
    if raw.text is None:
        return raw.value
    try:
        return parse_json(raw.text)
    except JsonTextError as e:  # bad syntax, a 5000-digit number, nesting past the recursion limit
        at = f" at column {e.colno}" if e.colno is not None else ""
        raise BadRecord(INVALID_JSON, "<line>", f"not valid JSON ({e.msg}{at})") from None


_BOM_BYTES = BOM.encode("utf-8")


def _read_bytes(path: Path) -> bytes:
    """The bytes of a data file; one that cannot be read is a DataError naming it and why."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file: {e.strerror or e}", source=str(path)) from None


def _jsonl_raws(data: bytes) -> list[RawRecord]:
    """One record per non-blank line, each decoded on its own: a line that is not UTF-8 is a bad record
    (`invalid`), not a bad file. Lines end at \\n only (JSON text may hold U+2028 and other separators).
    A UTF-8 byte-order mark at the start of the file is dropped (editors on Windows write one)."""
    raws = []
    data = data.removeprefix(_BOM_BYTES)
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():  # blank lines are not records (trailing newlines, hand-edited files)
            continue
        try:
            raws.append(RawRecord(index=len(raws), line=lineno, text=line.decode("utf-8")))
        except UnicodeDecodeError as e:
            raws.append(RawRecord(index=len(raws), line=lineno,
                                  invalid=f"not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})"))
    return raws


def read_json_lines(path: str | os.PathLike[str], convert: Callable[[Any], T] | None = None, *,
                    on_bad_record: OnBadRecord = "error", report: BadRecordReport | None = None,
                    what: str = "a JSON Lines file", skip_option: str | None = None) -> list[tuple[int, T]]:
    """(line number, record) for each non-blank line of a JSON Lines file a verb reads (a groups file, Stage-A
    output, records to turn into other data), under the rules of training data: a UTF-8 BOM is dropped, each line
    decoded and parsed on its own (numbers of any length and any nesting are named, not crashed on), and
    `convert(value)` (when given) checks it and may raise BadRecord naming the field. A bad line is reported
    as a training source's bad record is: `on_bad_record="error"` raises a DataError naming the file, line,
    field and reason (exit 2; `skip_option`, when the verb has one, is named as the way to skip such lines);
    "skip" counts it in `report` and goes on. A file that is missing or cannot be read is a DataError naming it
    (`what` says what it should be)."""
    file = Path(path)
    if not file.is_file():
        problem = "is a directory" if file.is_dir() else "not found"
        raise DataError(f"{file}: {problem}; expected {what}", source=str(file))
    report = report if report is not None else BadRecordReport()
    out: list[tuple[int, Any]] = []
    for raw in _jsonl_raws(_read_bytes(file)):
        try:
            value = _parse(raw)
            out.append((raw.line or 0, convert(value) if convert is not None else value))
        except BadRecord as e:
            message = f"{file}: line {raw.line}: field {e.field}: {e.detail} [reason: {e.reason}]"
            if on_bad_record == "error":
                hint = f" ({skip_option} drops such lines and counts them)" if skip_option else ""
                raise DataError(message + hint, source=str(file), index=raw.index, reason=e.reason) from None
            report.add(str(file), raw.index, e.reason, message)
    return out


def _lines_of_json(data: bytes) -> bool:
    """Whether a .json file that is not UTF-8 as a whole is JSON Lines: its first line is a JSON value."""
    first = next((ln for ln in data.removeprefix(_BOM_BYTES).split(b"\n") if ln.strip()), b"")
    try:
        parse_json(first)
    except JsonTextError:
        return False
    return True


def _parsed(raws: list[RawRecord]) -> list[Any]:
    """The records of `raws` that parse (bad ones are left to the conversion, which reports them)."""
    out = []
    for raw in raws:
        try:
            out.append(_parse(raw))
        except BadRecord:
            continue
    return out


def _detect(path: Path, raws: list[RawRecord]) -> str:
    if not raws:  # nothing to tell a format by: say what is wrong with the file instead
        raise DataError(f"{path}: the file holds no records (empty, blank lines only, or an empty list); "
                        "name a file with records or remove it from the sources",
                        source=str(path), reason="empty_source")
    fmt = detect_record_format(_parsed(raws[:_DETECT_SCAN]))
    if fmt is not None:
        return fmt
    names = record_format_names()
    signs = "; ".join(f"{n}: {f.looks_like}" for n in names if (f := record_format(n)).looks_like)
    raise ConfigError(f"{path}: cannot tell the record format from its first records ({signs}); "
                      f"set format: to one of {', '.join(names)}")


@DATA_SOURCES.register("json")
class JsonFile(DataSource):
    """A .json file holding a list of records (or one record), or JSON Lines (.jsonl, or a .json with one
    record per line). Any file no other kind claims is read as one."""

    description = "a json or jsonl file of records"
    fallback = True

    def claims(self, path: Path) -> bool:
        """Any file."""
        return path.is_file()

    def load(self, path: Path, record_format: str, image_root: Path | None) -> list[RecordFile]:
        """The file's records; images resolve against `image_root` or the file's directory."""
        data = _read_bytes(path)
        try:
            text = data.decode("utf-8-sig")  # a BOM at the start is dropped
        except UnicodeDecodeError as e:
            if path.suffix != ".jsonl" and not _lines_of_json(data):
                line = data[:e.start].count(b"\n") + 1
                raise DataError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x}); a .json file "
                                "holding one list must be UTF-8 throughout", source=str(path),
                                reason=INVALID_JSON) from None
            text = None
        if text is None or path.suffix == ".jsonl":
            raws = _jsonl_raws(data)
        else:
            try:
                data = parse_json(text)
            except JsonTextError as e:  # bad syntax, a 5000-digit number, nesting past the recursion limit
                if e.msg != "Extra data":  # "Extra data" after the first value: a JSONL file named .json
                    raise DataError(f"{path}: {e}; a .json data file holds one JSON list of records (or JSON "
                                    "Lines: one record per line)", source=str(path), reason=INVALID_JSON) from None
                raws = _jsonl_raws(data)
            else:
                if isinstance(data, dict):
                    data = [data]  # a single record
                if not isinstance(data, list):
                    raise DataError(f"{path}: a .json data file must hold a list of records, "
                                    f"got {type(data).__name__}", source=str(path), reason=MALFORMED_RECORD)
                raws = [RawRecord(index=i, value=v) for i, v in enumerate(data)]
        return [RecordFile(path, self.resolve_format(path, raws, record_format), raws, image_root or path.parent)]


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


@DATA_SOURCES.register("hf_disk")
class SavedDataset(DataSource):
    """A directory written by `datasets`' `save_to_disk` (one split); image features stay in Arrow, as
    `DatasetImage` refs opened memory-mapped where they are decoded."""

    format_name = "hf_disk"
    description = "a directory written by datasets' save_to_disk"

    def claims(self, path: Path) -> bool:
        """Any directory."""
        return path.is_dir()

    def load(self, path: Path, record_format: str, image_root: Path | None) -> list[RecordFile]:
        """The split's rows as records; path-string images resolve against `image_root` or the directory."""
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
        raws = [RawRecord(index=i, value=r) for i, r in enumerate(rows)]
        return [RecordFile(path, self.resolve_format(path, raws, record_format), raws, image_root or path)]


@DATA_SOURCES.register("yaml")
class FileList(DataSource):
    """A YAML list of record files (LLaVA-OneVision style): `datasets: [{json_path, sampling_strategy}]`,
    each file sampled by its own strategy (`all`, `first:N`, `random:N`); paths relative to the YAML file."""

    description = "a YAML file with a 'datasets:' list of {json_path, sampling_strategy}"

    def claims(self, path: Path) -> bool:
        """A .yaml / .yml file."""
        return path.is_file() and path.suffix in YAML_SUFFIXES

    def files(self, path: Path) -> list[Path]:
        """The list and every file it names."""
        return [path, *(child for _, child, _ in self._entries(path))]

    def load(self, path: Path, record_format: str, image_root: Path | None) -> list[RecordFile]:
        """One RecordFile per entry, each read by the kind that claims it (not another list)."""
        files = []
        for where, child, strategy in self._entries(path):
            kind = source_kind(child, record_format)
            if isinstance(kind, FileList):
                raise ConfigError(f"{where}: {child} is itself a list of files; name record files only")
            for file in kind.load(child, record_format, image_root):
                file.sample, file.salt = strategy, child.name
                files.append(file)
        return files

    @staticmethod
    def _entries(path: Path) -> list[tuple[str, Path, str]]:
        """(where, file, sampling_strategy) of each entry."""
        # the config loader's hardened reader: UTF-8, plain types only (no tags, aliases or merge keys),
        # bounded size and depth; each problem a ConfigError naming the file and line
        doc = read_plain_yaml(path)
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
            child = _resolve_path(entry["json_path"], path.parent, f"{where}.json_path")
            if not child.exists():
                raise ConfigError(f"{where}.json_path: {child} does not exist (a relative json_path is relative to "
                                  f"{path.name}'s folder)")
            entries.append((where, child, strategy))
        return entries


# ------------------------------------------------------------------------------------------------ records


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
    # normpath, not Path.resolve(): no system call per image (image_dir is resolved already)
    return os.path.normpath(os.path.join(image_dir, os.path.expanduser(value)))


def _image_sizes(images: list[ImageRef], fields: dict[ImageRef, str],
                 max_pixels: int | None) -> list[tuple[int, int]]:
    """(width, height) of each image from its header, the one header read of the data path."""
    sizes = []
    for i, ref in enumerate(images):
        try:
            sizes.append(image_size(ref, max_pixels))
        except DataError as e:
            raise BadRecord(e.reason or MALFORMED_RECORD, fields.get(ref, f"<image {i}>"), str(e)) from None
    return sizes


def _conversation(file: RecordFile, fmt: RecordFormat, raw: RawRecord, check_images: bool,
                  max_pixels: int | None) -> Conversation:
    """One record through its format, the shared conversation rules and the image header check."""
    fields: dict[ImageRef, str] = {}

    def resolve(value: Any, field: str) -> ImageRef:
        ref = _to_ref(value, field, file.image_dir)
        fields.setdefault(ref, field)
        return ref

    record = _parse(raw)
    try:
        messages, images, meta = fmt.convert(record, resolve)
    except BadRecord as e:
        if e.reason not in BAD_RECORD_REASONS and e.reason not in fmt.reasons:
            raise TypeError(f"record format {file.record_format!r} ({type(fmt).__qualname__}) raised BadRecord "
                            f"with reason {e.reason!r}, which it does not declare in `reasons`") from e
        raise
    for key in VIDEO_FIELDS:
        if meta.get(key):  # e.g. an ms-swift record's `videos`: never trained as text-only, silently
            raise BadRecord(UNSUPPORTED_VIDEO, key, VIDEO_UNSUPPORTED)
    messages = prepare_messages(messages, len(images), fmt.messages_field)
    sizes = _image_sizes(images, fields, max_pixels) if check_images else None
    return Conversation(messages=messages, images=list(images), source=str(file.path), index=raw.index, meta=meta,
                        image_sizes=sizes, line=raw.line)


def _read_file(file: RecordFile, sample: str, rng: random.Random, on_bad_record: OnBadRecord,
               report: BadRecordReport, check_images: bool, max_pixels: int | None,
               workers: int | None = 1) -> list[Conversation]:
    """Convert the sampled records. Sampling picks good records: `first:N` converts records in file
    order until N are good, `random:N` in a seeded random order; records never picked are never checked.
    A bad record is counted or raised per `on_bad_record`. `sample: all` converts (and reads the image
    headers) in `workers` processes; the policy is applied in record order, so the result does not depend on it."""
    mode, n = parse_sample(sample)
    order: list[int] | range = range(len(file.raws))
    if mode == "random":
        order = rng.sample(range(len(file.raws)), len(file.raws))
    want = len(file.raws) if n is None else n
    fmt = record_format(file.record_format)

    def convert(i: int) -> Conversation | tuple[int, str, str]:
        raw = file.raws[i]
        try:
            return _conversation(file, fmt, raw, check_images, max_pixels)
        except BadRecord as e:
            where = f"record {raw.index}" + (f" (line {raw.line})" if raw.line is not None else "")
            return raw.index, e.reason, (f"{file.path}: {where}: field {e.field}: {e.detail} "
                                         f"[reason: {e.reason}; format: {file.record_format}]")

    # all records: convert them all at once (in parallel); a sample: one by one until it has enough
    results = ordered_map(convert, order, workers) if n is None else (convert(i) for i in order)
    out = []
    for result in results:
        if len(out) >= want:
            break
        if isinstance(result, Conversation):
            out.append(result)
        else:
            index, reason, message = result
            reject_record(on_bad_record, report, str(file.path), index, reason, message)
    if mode == "random":
        out.sort(key=lambda c: c.index)  # a subset in file order: easier to inspect, same content
    return out


def _apply_weight(convs: list[T], weight: float, rng: random.Random) -> list[T]:
    """round(weight * n) records: whole copies of the list for weight >= 1, then a seeded random remainder kept
    in file order (so without the mix shuffle, weight 2.5 reads: the records twice in order, then half of them)."""
    n = len(convs)
    k = math.floor(weight * n + 0.5)  # half up: round() would send 2.5 to 2 but 3.5 to 4
    full, rest = divmod(k, n)
    picked = sorted(rng.sample(range(n), rest))
    return convs * full + [convs[i] for i in picked]


def _files_under(paths: list[Path]) -> list[Path]:
    """The files of `paths`, a directory standing for every file under it (sorted)."""
    out: list[Path] = []
    for p in paths:
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


def content_fingerprint(paths: list[Path]) -> dict[str, Any]:
    """What identifies the content of some files: their total `bytes` and a `digest` of each file's name and
    content (`arctic_vl.checkpoint.fingerprint.file_digest`: whole up to 32 MiB, else 16 blocks spread over it;
    no mtime: a copied file keeps it)."""
    files = _files_under(paths)
    return {"bytes": sum(f.stat().st_size for f in files), "digest": files_digest(files)}


def read_source_records(spec: SourceSpec, *, base_dir: Path, seed: int, on_bad_record: OnBadRecord,
                        report: BadRecordReport, check_images: bool = True,
                        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                        fingerprints: dict[str, Any] | None = None, workers: int | None = 1) -> list[Conversation]:
    """Read and sample one source, before its weight: each picked record once, in file order (see
    `read_source`). `workers`: processes converting the records of a `sample: all` file."""
    path = _resolve_path(spec.path, Path(base_dir), "data source path")
    image_root = _resolve_path(spec.image_root, Path(base_dir), "data source image_root") if spec.image_root else None
    salt = f"{seed}:{spec.path}"
    files = source_kind(path, spec.format).load(path, spec.format, image_root)
    if fingerprints is not None:
        listed = [path] + [f.path for f in files if f.path != path]  # a YAML list and the files it names
        fingerprints[str(path)] = {"records": sum(len(f.raws) for f in files), **content_fingerprint(listed)}
    if len(files) == 1 and files[0].sample is None:
        convs = _read_file(files[0], spec.sample, random.Random(f"{salt}:sample"), on_bad_record, report,
                           check_images, max_image_pixels, workers)
    else:  # a list of files, each sampled by its own strategy; the source's `sample` applies to them all
        convs = []
        for file in files:
            rng = random.Random(f"{salt}:{file.salt or file.path.name}")
            convs += _read_file(file, file.sample or "all", rng, on_bad_record, report, check_images,
                                max_image_pixels, workers)
        mode, n = parse_sample(spec.sample)
        if mode == "first":
            convs = convs[:n]
        elif mode == "random" and n < len(convs):
            keep = sorted(random.Random(f"{salt}:sample").sample(range(len(convs)), n))
            convs = [convs[i] for i in keep]
    if not convs:
        raise DataError(f"{path}: no usable records ({report.total} bad records skipped in all sources so far)",
                        source=str(path), reason="empty_source")
    if fingerprints is not None:  # the image files the kept records name: replaced images refuse a resume too
        fingerprints[str(path)]["images"] = images_digest([r for c in convs for r in c.images if isinstance(r, str)])
    return convs


def weigh(items: list[T], spec: SourceSpec, seed: int) -> list[T]:
    """A source's items (its records, or anything made of them one to one) repeated / subsampled by its weight.

    More than MAX_WEIGHTED_RECORDS items after weighting is a ConfigError naming the source, its weight and the
    count it would make (before anything is allocated)."""
    wanted = math.floor(spec.weight * len(items) + 0.5)
    if wanted > MAX_WEIGHTED_RECORDS:
        raise ConfigError(f"{spec.path}: weight {spec.weight:g} x {len(items)} records would sample {wanted} records; "
                          f"a source may contribute at most {MAX_WEIGHTED_RECORDS} (lower the weight)")
    out = _apply_weight(items, spec.weight, random.Random(f"{seed}:{spec.path}:weight"))
    if not out:
        raise DataError(f"{spec.path}: weight {spec.weight} leaves no records; raise the weight or drop the source",
                        source=str(spec.path), reason="empty_source")
    return out


def mix(items: list[T], seed: int, shuffle: bool) -> list[T]:
    """The sources' weighted items concatenated in the order listed, and (`shuffle`) shuffled by the seed."""
    if shuffle:
        random.Random(f"{seed}:mix").shuffle(items)
    return items


def read_source(spec: SourceSpec, *, base_dir: Path, seed: int, on_bad_record: OnBadRecord,
                report: BadRecordReport, check_images: bool = True,
                max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                fingerprints: dict[str, Any] | None = None, workers: int | None = 1) -> list[Conversation]:
    """Read, sample and weight one source. Relative paths resolve against `base_dir` (the config's
    directory). `check_images=False` skips the image header check (for huge, trusted datasets); an image
    whose header claims more than `max_image_pixels` pixels is a bad record (`image_too_large`). `fingerprints`,
    when given, gets the source's entry: its path -> records in its files and their `content_fingerprint`."""
    convs = read_source_records(spec, base_dir=base_dir, seed=seed, on_bad_record=on_bad_record, report=report,
                                check_images=check_images, max_image_pixels=max_image_pixels,
                                fingerprints=fingerprints, workers=workers)
    return weigh(convs, spec, seed)


def read_sources(specs: list[SourceSpec], *, base_dir: Path, seed: int, on_bad_record: OnBadRecord,
                 report: BadRecordReport, shuffle: bool = True, check_images: bool = True,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 fingerprints: dict[str, Any] | None = None, workers: int | None = 1) -> list[Conversation]:
    """Read all sources and mix them: concatenated by weight in the order listed, then (`shuffle`) a seeded
    shuffle; without it every record stays in file order. `fingerprints`: see `read_source`."""
    if not specs:
        raise ConfigError("no data sources given")
    out: list[Conversation] = []
    for spec in specs:
        out += read_source(spec, base_dir=base_dir, seed=seed, on_bad_record=on_bad_record, report=report,
                           check_images=check_images, max_image_pixels=max_image_pixels,
                           fingerprints=fingerprints, workers=workers)
    return mix(out, seed, shuffle)

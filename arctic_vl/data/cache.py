"""The encoded-records cache: a source read and tokenized once is loaded in a second run instead of redone.

An entry is one source's distinct records (sampled, before their weight) with their encodings, or the reason
each was dropped, and the bad records its reading counted. Its key is a hash of everything the entry is a
function of: the content of every file the source reads (all bytes, not dates), the tokenizer (its whole
serialised state and special tokens), the chat template, the processor's image settings, the encoding settings
(family, system prompt, max_length, the truncation and bad-record policies, the image limit), the source entry
and the seed, and the code (arctic_vl's data package, transformers' and tokenizers' versions). Image files are
not part of a source's bytes: the entry keeps each image's size and modification time and is used only while
they all still match. So a stale entry cannot be used: anything it depends on changes its key, or fails that
check, and is a miss. Entries hold JSON and numpy arrays only (read with `allow_pickle=False`), written
atomically; concurrent runs (ranks) writing the same entry write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from arctic_vl.constants import IGNORE_INDEX
from arctic_vl.data.bad_records import BadRecordReport
from arctic_vl.data.encoding import EncodedText, SampleEncoder
from arctic_vl.data.images import DatasetImage, ImageBytes, ImageRef
from arctic_vl.data.parallel import gc_paused
from arctic_vl.data.records import Conversation

#: bump when an entry's layout changes (the code hash changes anyway)
FORMAT = 1
_HASH_BLOCK = 1 << 20


def default_cache_dir() -> Path:
    """$ARCTIC_VL_CACHE_DIR, else $XDG_CACHE_HOME/arctic_vl/encoded, else ~/.cache/arctic_vl/encoded."""
    if os.environ.get("ARCTIC_VL_CACHE_DIR"):
        return Path(os.environ["ARCTIC_VL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arctic_vl" / "encoded"


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes (a directory: of every file under it, with their relative names)."""
    h = hashlib.blake2b(digest_size=20)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def _code_version() -> str:
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(Path(__file__).parent.glob("*.py")):  # the data package: readers, formats, encoding
        h.update(f.name.encode() + f.read_bytes())
    for dist in ("transformers", "tokenizers"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()


def encoder_identity(encoder: SampleEncoder) -> str:
    """A hash of everything of the encoder that its encodings depend on."""
    tok = encoder.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    image_processor = getattr(encoder.processor, "image_processor", None)
    parts = {
        "tokenizer": backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items())),
        "tokenizer_class": type(tok).__name__,
        "special": sorted(map(str, tok.all_special_tokens)),
        "added": sorted((i, t.content, t.special) for i, t in tok.added_tokens_decoder.items()),
        "chat_template": [getattr(encoder.processor, "chat_template", None), getattr(tok, "chat_template", None)],
        "image_processor": image_processor.to_json_string() if image_processor is not None else None,
        "family": encoder.family.name, "image_token": encoder.image_token, "system_prompt": encoder.system_prompt,
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()


def entry_key(files: list[Path], encoder_id: str, settings: dict[str, Any]) -> str:
    """The key of a source's entry: its files' content, the encoder, the settings, the code."""
    material = {"format": FORMAT, "code": _code_version(), "encoder": encoder_id, "settings": settings,
                "files": [file_digest(f) for f in files]}
    return hashlib.blake2b(json.dumps(material, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()


@dataclass
class CachedSource:
    """One source's distinct records, each one's encoding (None: dropped) and the bad records its reading and
    encoding counted (replayed into the run's report on a hit)."""

    conversations: list[Conversation]
    encoded: list[EncodedText | None]
    report: BadRecordReport
    #: the source's `DataBundle.fingerprint` entry (its record count is known only once it was read)
    fingerprint: dict[str, Any]


# ------------------------------------------------------------------------------------------ (de)serialise
def _ref_to_json(ref: ImageRef) -> Any:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, DatasetImage):
        return {"dataset": [ref.dataset_path, ref.row, ref.column, ref.item]}
    return {"bytes": ref.data.hex(), "name": ref.name}


def _ref_from_json(value: Any) -> ImageRef:
    if isinstance(value, str):
        return value
    if "dataset" in value:
        return DatasetImage(*value["dataset"])
    return ImageBytes(bytes.fromhex(value["bytes"]), value["name"])


def _image_stats(convs: list[Conversation]) -> list[list[Any]]:
    """[path, size, mtime_ns] of every image file the records name (inline and dataset images are in the bytes
    the key hashes)."""
    seen: dict[str, list[Any]] = {}
    for conv in convs:
        for ref in conv.images:
            if isinstance(ref, str) and ref not in seen:
                st = os.stat(ref)
                seen[ref] = [ref, st.st_size, st.st_mtime_ns]
    return list(seen.values())


def _images_unchanged(stats: list[list[Any]]) -> bool:
    for path, size, mtime in stats:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != size or st.st_mtime_ns != mtime:
            return False
    return True


def save(directory: Path, key: str, entry: CachedSource) -> Path | None:
    """Write the entry atomically; None (nothing written) when its records do not serialise as JSON."""
    encoded = [e for e in entry.encoded if e is not None]
    ids = np.asarray([t for e in encoded for t in e.input_ids], dtype=np.int64)
    trained = np.asarray([lab != IGNORE_INDEX for e in encoded for lab in e.labels], dtype=bool)
    lengths = np.asarray([len(e.input_ids) for e in encoded], dtype=np.int64)
    report = entry.report
    try:
        meta = json.dumps({
            "conversations": [{"messages": c.messages, "images": [_ref_to_json(r) for r in c.images],
                               "source": c.source, "index": c.index, "meta": c.meta, "line": c.line,
                               "image_sizes": c.image_sizes} for c in entry.conversations],
            "encoded": [None if e is None else {"image_spans": e.image_spans, "unended": e.unended}
                        for e in entry.encoded],
            "report": {"counts": [[s, r, n] for (s, r), n in report.counts.items()], "examples": report.examples},
            "images": _image_stats(entry.conversations),
            "fingerprint": entry.fingerprint,
        })
    except (TypeError, ValueError, OSError):  # a record holding values JSON cannot hold, an image gone
        return None
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{key}.npz"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, ids=ids, trained=trained, lengths=lengths,
                     meta=np.frombuffer(meta.encode(), dtype=np.uint8))
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def load(directory: Path, key: str) -> CachedSource | None:
    """The entry of `key`, or None: no entry, an unreadable one, or one whose images changed since."""
    with gc_paused():  # a record's worth of lists and dicts at a time, no cycles: collections would cost 4x the load
        return _load(directory, key)


def _load(directory: Path, key: str) -> CachedSource | None:
    path = directory / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, trained, lengths = data["ids"], data["trained"], data["lengths"]
            meta = json.loads(data["meta"].tobytes())
    except (OSError, ValueError, KeyError):  # torn or foreign file: a miss, rewritten after encoding
        return None
    if not _images_unchanged(meta["images"]):
        return None
    convs = [Conversation(messages=c["messages"], images=[_ref_from_json(r) for r in c["images"]], source=c["source"],
                          index=c["index"], meta=c["meta"], line=c["line"],
                          image_sizes=None if c["image_sizes"] is None else [tuple(s) for s in c["image_sizes"]])
             for c in meta["conversations"]]
    # one conversion of the whole arrays, then list slices: a numpy call per record costs more than its work
    ids_all, labels_all = ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist()
    encoded: list[EncodedText | None] = []
    start, k = 0, 0
    sizes = lengths.tolist()
    for e in meta["encoded"]:
        if e is None:
            encoded.append(None)
            continue
        end = start + sizes[k]
        encoded.append(EncodedText(ids_all[start:end], labels_all[start:end],
                                   [tuple(s) for s in e["image_spans"]], e["unended"]))
        start, k = end, k + 1
    report = BadRecordReport()
    for source, reason, n in meta["report"]["counts"]:
        report.counts[(source, reason)] = n
    report.examples = [tuple(x) for x in meta["report"]["examples"]]
    return CachedSource(convs, encoded, report, meta["fingerprint"])

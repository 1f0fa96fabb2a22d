"""A local HF model directory, checked before `from_pretrained` and fingerprinted for resume.

`check_model_dir` reads only headers and small files: config.json parses and names a `model_type`; there
are weights (model.safetensors, a model.safetensors.index.json and its shards, or pytorch_model.bin); every
safetensors header parses and its tensors' data offsets cover the file exactly (a truncated or padded file
is named, with the bytes the header promises and the bytes there); every shard an index names exists, holds
the keys the index puts there and stays inside the directory (no `../`, no absolute path, no symbolic link
out of it: an index must not load weights from elsewhere; a Hugging Face cache snapshot, whose files link
into the cache's own `blobs/`, is the one exception); the tokenizer and processor JSON files parse. Every
problem is a ConfigError (exit 2) naming the directory, the file and what is wrong.

`model_fingerprint` is what a checkpoint records of the directory (see `arctic_vl.checkpoint.fingerprint`):
per file that loading reads, its size and a digest (config, tokenizer and processor files whole, weight files
by their safetensors header and sampled blocks).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from arctic_vl.checkpoint.fingerprint import MODEL_WHOLE_BELOW, file_digest
from arctic_vl.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: JSON files of the tokenizer and processor that loading parses (checked when present)
JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
              "chat_template.json", "generation_config.json")
#: bytes per element of each safetensors dtype
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # the safetensors format's own limit
#: file suffixes that loading reads (weights, configs, tokenizer and processor files): what is fingerprinted
FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken")


def _bad(root: Path, name: str, what: str) -> ConfigError:
    return ConfigError(f"model directory {root}: {name}: {what}")


def read_json_file(root: Path, name: str) -> Any:
    """`root/name` parsed as JSON; unreadable or invalid: a ConfigError naming the directory, file and position."""
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _bad(root, name, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise _bad(root, name, "not UTF-8 text (not a JSON file)") from None
    except OSError as e:
        raise _bad(root, name, f"cannot be read: {e.strerror or e}") from None


def safetensors_header(root: Path, name: str) -> tuple[dict[str, Any], int]:
    """(tensors, header bytes) of the safetensors file `root/name`: the header must parse, and its tensors' data
    offsets must match their shapes and cover the file's data exactly. A ConfigError names what is wrong."""
    path = root / name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise _bad(root, name, f"{size} bytes: too short for a safetensors file (truncated)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise _bad(root, name, f"its header claims {n:,} bytes but the file has {size:,} "
                           "(truncated, or not a safetensors file)")
            header = json.loads(fh.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise _bad(root, name, "missing") from None
    except OSError as e:
        raise _bad(root, name, f"cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(root, name, "its header is not valid JSON (corrupt, or not a safetensors file)") from None
    if not isinstance(header, dict):
        raise _bad(root, name, "its header is not a JSON object (not a safetensors file)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for key, info in tensors.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            want = math.prod(int(d) for d in shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise _bad(root, name, f"tensor {key!r}: a header entry without a known dtype, a shape and two data "
                       "offsets (corrupt)") from None
        if not (0 <= begin <= stop) or stop - begin != want:
            raise _bad(root, name, f"tensor {key!r}: data offsets {begin}..{stop} do not hold its {dtype} shape "
                       f"{list(shape)} ({want:,} bytes) (corrupt)")
        end = max(end, stop)
    data = size - 8 - n
    if data < end:
        raise _bad(root, name, f"truncated: its header puts tensor data up to byte {8 + n + end:,}, the file has "
                   f"{size:,} bytes")
    if data > end:
        raise _bad(root, name, f"{data - end:,} bytes after the last tensor's data (corrupt or appended to)")
    return tensors, 8 + n


def _inside(root: Path, name: str) -> str | None:
    """Why the index entry `name` does not stay inside `root` (None when it does)."""
    p = Path(name)
    if p.is_absolute() or not name or ".." in p.parts:
        return "not a file name inside the model directory (an absolute path or one with '..')"
    target, real_root = (root / p).resolve(), root.resolve()
    if target == real_root or real_root not in target.parents:
        # a Hugging Face cache snapshot (hub/models--x/snapshots/REV/) links each file into hub/models--x/blobs/
        if real_root.parent.name == "snapshots" and target.parent == real_root.parent.parent / "blobs":
            return None
        return f"a symbolic link out of the model directory (to {target})"
    return None


def weight_files(root: Path) -> list[str]:
    """The safetensors files the directory's weights are in (index shards, else model.safetensors); [] for
    torch-format weights. No weights at all: a ConfigError."""
    if (root / INDEX_FILE).is_file():
        index = read_json_file(root, INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise _bad(root, INDEX_FILE, "has no 'weight_map' of tensor name -> shard file name")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            why = _inside(root, shard)
            if why is not None:
                raise _bad(root, INDEX_FILE, f"shard {shard!r} is {why}; refusing to load weights from outside")
            if not (root / shard).is_file():
                keys = [k for k, v in weight_map.items() if v == shard]
                raise _bad(root, shard, f"missing: {INDEX_FILE} puts {len(keys)} tensors there (e.g. {keys[0]!r})")
        return shards
    if (root / SAFETENSORS_FILE).is_file():
        return [SAFETENSORS_FILE]
    if any((root / name).is_file() for name in TORCH_WEIGHTS):
        return []
    others = sorted(p.name for p in root.glob("*.safetensors"))
    hint = f" ({', '.join(others)} without the {INDEX_FILE} that lists them)" if others else ""
    raise ConfigError(f"model directory {root}: no weights: no {SAFETENSORS_FILE}, {INDEX_FILE} or "
                      f"{TORCH_WEIGHTS[0]}{hint}")


def check_model_dir(path: str | Path) -> dict[str, str]:
    """Check a model directory before loading it (see the module docstring); returns tensor name -> the file
    that holds it (empty for torch-format weights)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"model directory {root} does not exist")
    if not (root / "config.json").is_file():
        raise ConfigError(f"model directory {root} has no config.json (not a saved HF model)")
    config = read_json_file(root, "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise _bad(root, "config.json", "not an HF model config: a JSON object with a 'model_type' string")
    for name in JSON_FILES:
        if (root / name).is_file():
            read_json_file(root, name)
    located: dict[str, str] = {}
    shards = weight_files(root)
    index = read_json_file(root, INDEX_FILE)["weight_map"] if (root / INDEX_FILE).is_file() else None
    for shard in shards:
        tensors, _ = safetensors_header(root, shard)
        located.update(dict.fromkeys(tensors, shard))
    if index is not None:
        for key, shard in index.items():
            if located.get(key) != shard:
                raise _bad(root, INDEX_FILE, f"puts tensor {key!r} in {shard}, which does not hold it")
    return located


def model_fingerprint(path: str | Path) -> dict[str, str]:
    """file name -> digest of each file of the model directory that loading reads (see the module docstring)."""
    root = Path(path)
    out: dict[str, str] = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.suffix not in FINGERPRINT_SUFFIXES or not p.is_file():
            continue
        head = 0
        if p.suffix == ".safetensors":
            try:
                with open(p, "rb") as fh:
                    head = 8 + struct.unpack("<Q", fh.read(8))[0]
            except (OSError, struct.error):
                head = 0
        out[p.name] = file_digest(p, whole_below=MODEL_WHOLE_BELOW, head=min(head, _MAX_HEADER))
    return out


def fingerprint_changes(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """What differs between two `model_fingerprint`s, one phrase per file."""
    out = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            out.append(f"{name} is gone")
        elif name not in saved:
            out.append(f"{name} was added")
        elif saved[name] != current[name]:
            out.append(f"{name} changed")
    return out

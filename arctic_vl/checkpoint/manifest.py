"""Checkpoint manifests: the size and SHA-256 of every file, written as the last act of a checkpoint write.

`manifest.json` lists every file of `step-N/` (DeepSpeed's shards included) with its size and SHA-256.
It is written after all other files are complete and flushed, just before the temporary folder is renamed
into place, so a checkpoint that has one was whole when it was written. `verify` recomputes it: a flipped
byte, a truncated or missing file, a file added afterwards or an unreadable one each fail verification,
named. A checkpoint written before manifests existed (no manifest, no `checkpoint_format` in its
trainer_state.json) is checked structurally instead: its torch files' zip CRCs and its safetensors headers.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
#: written into trainer_state.json by checkpoints that carry a manifest: its absence is then an error
CHECKPOINT_FORMAT = 2
_CHUNK = 8 << 20


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(root: Path) -> list[Path]:
    """Every regular file under `root` except the manifest itself, sorted by relative path."""
    return sorted((p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST),
                  key=lambda p: p.relative_to(root).as_posix())


def build_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the files under `root` as they are now."""
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in checkpoint_files(root)}
    return {"format": 1, "algorithm": "sha256", "files": files}


def verify(root: Path, state: dict[str, Any] | None) -> tuple[list[str], bool]:
    """(problems, has_manifest) of the checkpoint in `root`; `state` is its trainer_state.json (None if it did
    not parse). No problems means the checkpoint is what was written."""
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        if state is not None and state.get("checkpoint_format", 0) >= CHECKPOINT_FORMAT:
            return [f"{MANIFEST}: missing (the checkpoint was written with one)"], False
        return _structural(root), False
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        listed = manifest["files"]
        assert isinstance(listed, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        return [f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"], True
    problems = []
    for name, want in sorted(listed.items()):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name}: not a path inside the checkpoint")
            continue
        problems.extend(_check_file(root / name, name, want))
    present = {p.relative_to(root).as_posix() for p in checkpoint_files(root)}
    problems.extend(f"{name}: not in the manifest (added after the checkpoint was written)"
                    for name in sorted(present - set(listed)))
    return problems, True


def _check_file(path: Path, name: str, want: Any) -> list[str]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [f"{name}: missing"]
    except OSError as e:
        return [f"{name}: unreadable ({e.strerror})"]
    if not isinstance(want, dict) or "size" not in want or "sha256" not in want:
        return [f"{name}: bad manifest entry {want!r}"]
    if size != want["size"]:
        return [f"{name}: {size} bytes, the manifest says {want['size']} (truncated or rewritten)"]
    try:
        digest = sha256_of(path)
    except OSError as e:
        return [f"{name}: unreadable ({e.strerror})"]
    if digest != want["sha256"]:
        return [
            f"{name}: contents differ from the manifest (sha256 {digest[:12]}..., expected {want['sha256'][:12]}...)"
        ]
    return []


def _structural(root: Path) -> list[str]:
    """What can be checked without a manifest: torch files' zip CRCs, safetensors headers and lengths."""
    problems = []
    for path in checkpoint_files(root):
        name = path.relative_to(root).as_posix()
        try:
            if path.suffix == ".pt":
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad is not None:
                    problems.append(f"{name}: record {bad} fails its CRC (corrupt)")
            elif path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    f.keys()
        except (OSError, zipfile.BadZipFile) as e:
            problems.append(f"{name}: unreadable or truncated ({e})")
        except Exception as e:  # safetensors' SafetensorError
            problems.append(f"{name}: not a complete safetensors file ({str(e).splitlines()[0] if str(e) else e})")
    return problems

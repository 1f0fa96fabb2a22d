"""Checkpoint file I/O: every read and write names its file and why it failed.

A write that fails because the disk is full says so, with the bytes the checkpoint needs and the bytes
free (torch reports a full disk as `RuntimeError: [enforce fail at inline_container.cc]`, safetensors as
an `IoError`; both are recognised, as is any failure while the disk has less room than the write needs).
A file that cannot be read (missing, truncated, corrupt, not what its name says) is a `CheckpointError`
naming it. Loading never unpickles: torch files load with `weights_only=True`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from arctic_vl.config.run_files import no_follow_opener, replace_file
from arctic_vl.errors import CheckpointError


def human_bytes(n: float) -> str:
    """`1536` -> `1.5 KiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent); None if unknown."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def disk_full(e: BaseException, path: Path, needed: int) -> bool:
    """Whether the failed write `e` of `path` (`needed` bytes) ran out of room."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left" in text or "StorageFull" in text or "Disk quota exceeded" in text:
        return True
    free = free_bytes(path)
    return free is not None and free < needed


def write_error(path: Path, e: BaseException, needed: int, what: str = "checkpoint") -> CheckpointError:
    """The error for a failed write of `path`; `needed`: the bytes the whole `what` needs (an estimate)."""
    if disk_full(e, path, needed):
        free = free_bytes(path)
        room = f", {free:,} bytes ({human_bytes(free)}) are free" if free is not None else ""
        after = (": the previous checkpoint is intact" if what == "checkpoint"
                 else ": the run resumes from its latest checkpoint")
        return CheckpointError(
            f"{path}: the disk is full at {path.parent}: this {what} needs about {needed:,} bytes "
            f"({human_bytes(needed)}){room}. Free space there (or lower checkpoint.keep_last) and run the same "
            f"command again{after}"
        )
    lines = str(e).strip().splitlines()
    reason = getattr(e, "strerror", None) or (lines[-1] if lines else type(e).__name__)
    return CheckpointError(f"{path}: cannot write this {what if what == 'run file' else what + ' file'}: {reason}")


def write_with(path: Path, write: Callable[[Path], None], needed: int, what: str = "checkpoint") -> None:
    """Run `write(path)`, turning any failure into a CheckpointError naming `path` (and a full disk); `what`
    names the whole being written in the message ("checkpoint", "run file")."""
    try:
        write(path)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise write_error(path, e, needed, what) from None
    except Exception as e:  # safetensors' SafetensorError (a Rust error type) derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise write_error(path, e, needed, what) from None


def save_torch(obj: Any, path: Path, needed: int) -> None:
    """`torch.save(obj, path)` with named errors."""
    write_with(path, lambda p: torch.save(obj, p), needed)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, needed: int) -> None:
    """The tensors as a safetensors file, with named errors."""
    from safetensors.torch import save_file

    write_with(path, lambda p: save_file(tensors, str(p)), needed)


def save_json(data: Any, path: Path, needed: int) -> None:
    """`data` as indented JSON, with named errors (never through a symbolic link at `path`)."""

    def write(p: Path) -> None:
        with open(p, "w", encoding="utf-8", opener=no_follow_opener) as fh:
            fh.write(json.dumps(data, indent=1))

    write_with(path, write, needed)


def write_run_file(path: Path, text: str) -> None:
    """Write one of the run's own files (config.yaml, run_info.json, summary.json, a rewritten metrics file)
    through a temporary file, so a failure leaves the previous version; a full disk or any other write error
    is a CheckpointError (exit 1) naming the file. A symbolic link at `path` (or at the temporary name) is a
    ConfigError (exit 2) naming it, its target untouched (`arctic_vl.config.run_files`)."""
    write_with(path, lambda p: replace_file(p, text), len(text.encode()), "run file")


def append_line(path: Path, line: str) -> None:
    """Append `line` and a newline to the run's JSONL file `path` (metrics.jsonl, eval.jsonl) in one write; a
    full disk or another write error is a CheckpointError (exit 1) naming the file. A partial line from a kill
    is dropped on resume (the metrics file's torn-line rule). A symbolic link (or anything but a regular file of
    its own) at `path` is a ConfigError (exit 2) naming it, never followed."""

    def write(p: Path) -> None:
        with open(p, "a", encoding="utf-8", opener=no_follow_opener) as fh:
            fh.write(line + "\n")

    write_with(path, write, len(line.encode()) + 1, "run file")


def fsync_file(path: Path, needed: int) -> None:
    """Flush `path` to disk (a full disk may only show here, with delayed allocation)."""

    def sync(p: Path) -> None:
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())

    write_with(path, sync, needed)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_torch(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a missing, corrupt or pickled-code file is a CheckpointError."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load: {_read_reason(e)}") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a missing, truncated or corrupt one is a CheckpointError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load: {_read_reason(e)} (not a complete safetensors file)") from None


def load_json(path: Path) -> Any:
    """A JSON file; a missing or broken one is a CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read: {_read_reason(e)}") from None

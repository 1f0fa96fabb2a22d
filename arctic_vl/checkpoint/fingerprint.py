"""Cheap content digests of a run's inputs (data files, images, model directories), saved with each checkpoint
and compared on resume: an input that changed under a resumed run is refused by name.

`file_digest` hashes (BLAKE2b-128) a file's size and its bytes: the whole file when it is at most `whole_below`
bytes, else `blocks` blocks of `block` bytes spread evenly from its first byte to its last (both ends
included), plus an optional `head` (e.g. a safetensors header, hashed whole). An edit that keeps the size is
then always seen in a small file, and in a large one when it touches a sampled block; any change of size is
seen. No mtime: a copied file keeps its digest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: data files (JSON/JSONL/YAML lists) up to this size are hashed whole
DATA_WHOLE_BELOW = 32 << 20
#: image files up to this size are hashed whole; larger ones in IMAGE_BLOCKS blocks of IMAGE_BLOCK bytes
IMAGE_WHOLE_BELOW = 64 << 10
IMAGE_BLOCK, IMAGE_BLOCKS = 16 << 10, 4
#: model files (config, tokenizer, processor: small) up to this size are hashed whole; weight files are sampled
MODEL_WHOLE_BELOW = 16 << 20
#: larger files: this many blocks of this many bytes (1 MiB read per file)
BLOCK, BLOCKS = 64 << 10, 16


def file_digest(path: str | os.PathLike[str], *, whole_below: int = DATA_WHOLE_BELOW, block: int = BLOCK,
                blocks: int = BLOCKS, head: int = 0) -> str:
    """The hex digest of `path`'s size and content (see the module docstring for what is read)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(f"{size}\0".encode())
        if size <= whole_below:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
            return h.hexdigest()
        if head:
            h.update(fh.read(min(head, size)))
        last = max(size - block, 0)
        offsets = sorted({round(i * last / max(blocks - 1, 1)) for i in range(blocks)})
        for offset in offsets:
            fh.seek(offset)
            h.update(fh.read(block))
    return h.hexdigest()


def files_digest(paths: list[Path], **kwargs: int) -> str:
    """One digest over several files: each one's name and `file_digest`, in the order given."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        h.update(f"{Path(p).name}\0{file_digest(p, **kwargs)}\0".encode())
    return h.hexdigest()


def images_digest(paths: list[str]) -> dict[str, int | str]:
    """{count, bytes, digest} of the distinct image files `paths` (sorted): each one's path and `file_digest`
    (whole up to IMAGE_WHOLE_BELOW bytes, else IMAGE_BLOCKS blocks of IMAGE_BLOCK bytes). A missing file counts
    as such (the reader reports it as a bad record)."""
    h = hashlib.blake2b(digest_size=16)
    total = 0
    unique = sorted(set(paths))
    for p in unique:
        try:
            digest = file_digest(p, whole_below=IMAGE_WHOLE_BELOW, block=IMAGE_BLOCK, blocks=IMAGE_BLOCKS)
            total += os.stat(p).st_size
        except OSError:
            digest = "missing"
        h.update(f"{p}\0{digest}\0".encode())
    return {"count": len(unique), "bytes": total, "digest": h.hexdigest()}

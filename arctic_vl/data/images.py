"""Image references: cheap, picklable handles that data workers turn into pixels lazily.

An `ImageRef` is one of
- `str`: an absolute path to an image file;
- `DatasetImage`: a cell of a `datasets.save_to_disk` directory (image feature stored in Arrow), re-opened
  memory-mapped in whichever process asks for it, so a list of millions of refs costs only a few ints each;
- `ImageBytes`: encoded image bytes carried inline (small images, tests, in-memory datasets).

Readers resolve refs with `image_size` (header only, no pixel decode) and `open_image` (RGB pixels).
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from arctic_vl.errors import DataError

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"


@dataclass(frozen=True)
class DatasetImage:
    """An image stored in a column of a `save_to_disk` dataset; `item` indexes into list-of-image cells."""

    dataset_path: str
    row: int
    column: str
    item: int | None = None

    def __str__(self) -> str:
        item = "" if self.item is None else f"[{self.item}]"
        return f"{self.dataset_path}[{self.row}].{self.column}{item}"


@dataclass(frozen=True)
class ImageBytes:
    """Encoded image bytes (PNG, JPEG, ...) carried inline; `name` is only for messages."""

    data: bytes
    name: str = "<bytes>"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:  # the bytes would flood logs and error messages
        return f"ImageBytes(name={self.name!r}, {len(self.data)} bytes)"


ImageRef = str | DatasetImage | ImageBytes


@functools.lru_cache(maxsize=16)
def _arrow_table(dataset_path: str) -> Any:
    """The memory-mapped Arrow table of a saved dataset, opened once per process (workers included)."""
    import datasets  # heavy import: only when a dataset image is actually resolved

    return datasets.load_from_disk(dataset_path).data


def _dataset_cell(ref: DatasetImage) -> dict[str, Any]:
    """The stored {"bytes", "path"} struct of a dataset image, without decoding any pixels."""
    try:
        value = _arrow_table(ref.dataset_path).column(ref.column)[ref.row].as_py()
    except (FileNotFoundError, KeyError, IndexError) as e:
        raise DataError(f"image {ref}: cannot be read from the dataset ({e})", source=str(ref),
                        reason=MISSING_IMAGE) from e
    if ref.item is not None:
        if not isinstance(value, list) or ref.item >= len(value):
            raise DataError(f"image {ref}: the cell holds no item {ref.item}", source=str(ref),
                            reason=MISSING_IMAGE)
        value = value[ref.item]
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return value
    raise DataError(f"image {ref}: the cell holds no image (got {type(value).__name__})", source=str(ref),
                    reason=MISSING_IMAGE)


def _open_stream(ref: ImageRef) -> tuple[BinaryIO | str, str]:
    """A file path or byte stream for PIL, and the name to use in messages."""
    if isinstance(ref, str):
        if not os.path.isfile(ref):
            raise DataError(f"image {ref}: file not found", source=ref, reason=MISSING_IMAGE)
        return ref, ref
    if isinstance(ref, ImageBytes):
        return io.BytesIO(ref.data), ref.name
    if isinstance(ref, DatasetImage):
        cell = _dataset_cell(ref)
        if cell.get("bytes"):
            return io.BytesIO(cell["bytes"]), str(ref)
        path = cell["path"]
        if not os.path.isfile(path):
            raise DataError(f"image {ref}: file {path} not found", source=str(ref), reason=MISSING_IMAGE)
        return path, str(ref)
    raise TypeError(f"not an ImageRef: {type(ref).__name__}")


def image_size(ref: ImageRef) -> tuple[int, int]:
    """(width, height) from the image header only; DataError `missing_image` / `unreadable_image`."""
    stream, name = _open_stream(ref)
    try:
        with Image.open(stream) as im:  # lazy: reads the header, decodes no pixels
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"image {name}: not a readable image ({e})", source=name,
                        reason=UNREADABLE_IMAGE) from e


def open_image(ref: ImageRef) -> Image.Image:
    """Decode the image to RGB; DataError `missing_image` / `unreadable_image`."""
    stream, name = _open_stream(ref)
    try:
        with Image.open(stream) as im:
            return im.convert("RGB")  # convert() forces the decode, so truncated files fail here
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"image {name}: cannot be decoded ({e})", source=name,
                        reason=UNREADABLE_IMAGE) from e

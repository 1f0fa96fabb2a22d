"""Image references: cheap, picklable handles that data workers turn into pixels lazily.

An `ImageRef` is one of
- `str`: an absolute path to an image file;
- `DatasetImage`: a cell of a `datasets.save_to_disk` directory (image feature stored in Arrow), re-opened
  memory-mapped in whichever process asks for it, so a list of millions of refs costs only a few ints each;
- `ImageBytes`: encoded image bytes carried inline (small images, tests, in-memory datasets).

Readers resolve refs with `image_size` (header only, no pixel decode) and `open_image` (RGB pixels).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from arctic_vl.errors import DataError

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
IMAGE_TOO_LARGE = "image_too_large"
#: the default `data.max_image_pixels`: where PIL itself refuses an image as a decompression bomb (2 x its
#: MAX_IMAGE_PIXELS), so every image PIL opens by default still opens; lower it to refuse smaller ones
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
_PIL_LIMIT = threading.Lock()


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


@contextlib.contextmanager
def _opened(ref: ImageRef, max_pixels: int | None) -> Iterator[tuple[Image.Image, str]]:
    """The image opened lazily (header read, no pixels) and its name; DataError `missing_image`,
    `unreadable_image`, or `image_too_large` when its header claims more than `max_pixels` pixels."""
    stream, name = _open_stream(ref)
    try:
        with _PIL_LIMIT:  # our limit replaces PIL's global one (its DecompressionBombError is a bare Exception)
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(stream)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image {name}: not a readable image ({e})", source=name,
                        reason=UNREADABLE_IMAGE) from e
    with im:
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise DataError(f"image {name}: {width} x {height} = {width * height} pixels is more than "
                            f"data.max_image_pixels ({max_pixels}); a decompression bomb or an image to shrink "
                            "first", source=name, reason=IMAGE_TOO_LARGE)
        yield im, name


def image_size(ref: ImageRef, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the image header only; DataError `missing_image` / `unreadable_image` /
    `image_too_large` (more than `max_pixels` pixels; None: no limit)."""
    with _opened(ref, max_pixels) as (im, _):
        return im.size


def open_image(ref: ImageRef, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode the image to RGB; DataError `missing_image` / `unreadable_image` (pixels that do not decode:
    a truncated file, a broken data stream) / `image_too_large`."""
    with _opened(ref, max_pixels) as (im, name):
        try:
            return im.convert("RGB")  # convert() forces the decode, so truncated files fail here
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for broken pixels
            raise DataError(f"image {name}: cannot be decoded ({type(e).__name__}: {e})", source=name,
                            reason=UNREADABLE_IMAGE) from e

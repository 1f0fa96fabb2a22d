"""Answer coordinates per family: how a pixel-space geometry is written in the assistant's JSON, and back.

* `norm1000`: integers in [0, 1000]: round(x / W * 1000), y by H (arctic_vl's `to_norm1000`, round half
  up), W x H the image as given to the processor (after augmentation). Qwen2-VL and Qwen3-VL read boxes so.
* `pixels`: absolute pixels of the image the model actually sees. For the Qwen families that is the image
  after the processor's own resize (`smart_resize` of the processor's module, with its patch size, merge size
  and pixel budget), which is what Qwen2.5-VL is trained on (ms-swift writes the same); for the LLaVA
  families (no single resized image: any-res tiles) the image as given.
* `auto`: `pixels` for qwen2_5_vl, `norm1000` for every other family.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

CoordsMode = Literal["auto", "norm1000", "pixels"]
#: families whose answers use absolute pixels of the resized image under `coords: auto`
PIXEL_FAMILIES = ("qwen2_5_vl",)


def resolve_mode(mode: str, family_name: str) -> str:
    """`auto` -> the family's convention; `norm1000` / `pixels` as given."""
    if mode == "auto":
        return "pixels" if family_name in PIXEL_FAMILIES else "norm1000"
    if mode not in ("norm1000", "pixels"):
        raise ValueError(f"coords {mode!r}; allowed: auto, norm1000, pixels")
    return mode


def seen_size(processor: Any, family: Any, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the image the model sees for a `width` x `height` input.

    Qwen: the image processor's own resize rule (its module's `smart_resize`, factor = patch x merge size,
    the processor's min/max pixels). LLaVA: the input size (the model sees tiles of it, not one image).
    """
    if not getattr(family, "is_qwen", False):
        return width, height
    ip = processor.image_processor
    module = importlib.import_module(type(ip).__module__)
    resize = getattr(module, "smart_resize", None)
    if resize is None:  # every Qwen image processor module defines or imports it; be explicit if one does not
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as resize
    size = ip.size if isinstance(ip.size, dict) else dict(ip.size)
    factor = int(ip.patch_size) * int(ip.merge_size)
    h, w = resize(height, width, factor=factor, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return int(w), int(h)


def round_half_up_scaled(v: float, num: int, den: int) -> int:
    """round(v * num / den), halves up, on the exact rational value (integers take an exact integer path)."""
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return (2 * int(v) * num + den) // (2 * den)
    return math.floor(Fraction(v) * num / den + Fraction(1, 2))


@dataclass(frozen=True)
class AnswerCoords:
    """The coordinate convention of one image's answer: `norm1000`, or `pixels` of a `seen` (w, h) image."""

    mode: str
    width: int
    height: int
    seen: tuple[int, int]

    @property
    def extent(self) -> tuple[int, int]:
        """The largest x and y an answer may hold."""
        return (1000, 1000) if self.mode == "norm1000" else self.seen

    def encode(self, coords: list[float]) -> list[int]:
        """Pixel coordinates [x, y, ...] of the (augmented) image -> the integers the answer writes."""
        if self.mode == "norm1000":
            from arctic_vl import to_norm1000

            return to_norm1000(coords, self.width, self.height)
        sw, sh = self.seen
        out = []
        for i, v in enumerate(coords):
            scale, limit, size = (sw, sw, self.width) if i % 2 == 0 else (sh, sh, self.height)
            out.append(min(limit, max(0, round_half_up_scaled(v, scale, size))))
        return out

    def decode(self, values: list[float]) -> list[float]:
        """The answer's numbers -> pixel coordinates of the image (the inverse of `encode`, up to rounding)."""
        ex, ey = self.extent
        return [float(v) * (self.width if i % 2 == 0 else self.height) / (ex if i % 2 == 0 else ey)
                for i, v in enumerate(values)]


def answer_coords(mode: str, family: Any, processor: Any, width: int, height: int) -> AnswerCoords:
    """The convention for one image of `width` x `height` (mode `auto` resolved by family)."""
    resolved = resolve_mode(mode, getattr(family, "name", ""))
    seen = seen_size(processor, family, width, height) if resolved == "pixels" else (1000, 1000)
    return AnswerCoords(resolved, width, height, seen)

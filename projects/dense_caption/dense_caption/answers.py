"""The assistant's answer: rendered from (augmented) geometry for training, parsed back for evaluation.

One image:      [{"bbox_2d": [x1, y1, x2, y2], "desc": "red circle"}, {"poly": [...], "desc": ...}, ...]
Several images: {"image_1": [...], "image_2": [...]}   (key prefix configurable)

With `data.answer_format: keyed` (the November documents' form) an image's objects are an object keyed
object_1, object_2, ... in answer order instead of a list:

One image:      {"object_1": {"bbox_2d": [x1, y1, x2, y2], "desc": "red circle"}, "object_2": {...}}
Several images: {"image_1": {"object_1": {...}, ...}, "image_2": {...}}

Summary mode:   the record's `summary` (one image) or {"image_1": "summary 1", "image_2": "summary 2"}

Coordinates are integers in the image's answer convention (`coords.AnswerCoords`). JSON is compact
(no spaces), which is also what a parse accepts best; parsing is lenient about whitespace only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from arctic_vl import JsonTextError, parse_json

from .coords import AnswerCoords
from .geometry import GEOMETRY_KEYS, Box, Geometry, Polygon, Polyline, Quad, from_coords


def _dedupe_points(values: list[int], closed: bool) -> list[int]:
    pts = [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
    out: list[tuple[int, int]] = []
    for p in pts:
        if not out or out[-1] != p:
            out.append(p)
    if closed and len(out) > 1 and out[0] == out[-1]:
        out.pop()
    return [c for p in out for c in p]


def render_object(geom: Geometry, desc: str, coords: AnswerCoords) -> dict[str, Any] | None:
    """`{key: numbers, "desc": desc}` in the answer convention; None when rounding leaves nothing (no width,
    height or length: too small to write)."""
    values = coords.encode(geom.coords())
    if isinstance(geom, Box):
        if values[0] >= values[2] or values[1] >= values[3]:
            return None
    elif isinstance(geom, Polygon):
        values = _dedupe_points(values, closed=True)
        if len(values) < 6:
            return None
        if isinstance(geom, Quad) and len(values) != 8:  # rounding merged corners: no longer four of them
            return {"poly": values, "desc": desc}
    elif isinstance(geom, Polyline):
        values = _dedupe_points(values, closed=False)
        if len(values) < 4:
            return None
    return {geom.key: values, "desc": desc}


def to_json(value: Any) -> str:
    """Compact JSON, non-ASCII kept (descriptions may be in any language)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def image_key(prefix: str, i: int) -> str:
    """The key of image i (0-based) in a multi-image answer: `image_1`, `image_2`, ..."""
    return f"{prefix}{i + 1}"


#: the keys of an image's objects in the keyed answer format: object_1, object_2, ...
OBJECT_KEY_PREFIX = "object_"
ANSWER_FORMATS = ("list", "keyed")


def keyed_objects(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`objects` as the keyed form {"object_1": objects[0], "object_2": objects[1], ...}."""
    return {f"{OBJECT_KEY_PREFIX}{i + 1}": o for i, o in enumerate(objects)}


def render_answer(per_image: list[Any], prefix: str, answer_format: str = "list") -> str:
    """One image: its value as JSON (a summary string as is); several: an object keyed per image. An image's
    object list is written as a list, or keyed object_1, ... with `answer_format: keyed`."""
    if answer_format == "keyed":
        per_image = [v if isinstance(v, str) else keyed_objects(v) for v in per_image]
    if len(per_image) == 1:
        value = per_image[0]
        return value if isinstance(value, str) else to_json(value)
    return to_json({image_key(prefix, i): v for i, v in enumerate(per_image)})


# ---------------------------------------------------------------------------------------------- parsing
@dataclass
class ParsedObject:
    """A predicted object: geometry in the answer's numbers (not yet pixels), its key and desc."""

    key: str
    values: list[float]
    desc: str


@dataclass
class ParsedAnswer:
    """A parsed dense answer: objects per image, or `error` (why it does not parse) and no objects."""

    images: list[list[ParsedObject]] = field(default_factory=list)
    error: str | None = None
    invalid_objects: int = 0  # entries of a well-formed answer that are not a valid object (skipped, counted)

    @property
    def ok(self) -> bool:
        """The answer parsed (as JSON of the right shape)."""
        return self.error is None


def _where(e: Any) -> str:
    return e.msg + (f" at line {e.lineno}, column {e.colno}" if e.lineno is not None else "")


def _parse_objects(value: Any, answer_format: str = "list") -> tuple[list[ParsedObject], int] | None:
    if answer_format == "keyed":
        if not isinstance(value, dict):
            return None
        value = list(value.values())  # the keys only order the objects (JSON keeps the order written)
    if not isinstance(value, list):
        return None
    out, bad = [], 0
    for entry in value:
        keys = [k for k in GEOMETRY_KEYS if isinstance(entry, dict) and k in entry]
        if len(keys) != 1 or not isinstance(entry.get("desc"), str):
            bad += 1
            continue
        nums = entry[keys[0]]
        if not isinstance(nums, list) or not nums or len(nums) % 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in nums):
            bad += 1
            continue
        need = {"bbox_2d": 4, "poly": 6, "quad": 8, "line": 4}[keys[0]]
        if (keys[0] in ("bbox_2d", "quad") and len(nums) != need) or len(nums) < need:
            bad += 1
            continue
        try:
            coords = [float(v) for v in nums]
        except OverflowError:  # a generated integer too large for a float: an invalid object, not a crash
            bad += 1
            continue
        if not all(math.isfinite(c) for c in coords):
            bad += 1
            continue
        out.append(ParsedObject(keys[0], coords, entry["desc"]))
    return out, bad


def parse_dense_answer(text: str, n_images: int, prefix: str, answer_format: str = "list") -> ParsedAnswer:
    """Parse a generated dense answer for `n_images` images in `answer_format` (list or keyed); never raises
    (failures are in `error`)."""
    shape = "a list of objects" if answer_format == "list" else f"an object keyed {OBJECT_KEY_PREFIX}1..."
    try:
        value = parse_json(text.strip())
    except JsonTextError as e:  # also a generated 5000-digit number or nesting past the recursion limit
        return ParsedAnswer(error=f"not JSON ({_where(e)})")
    if n_images == 1:
        parsed = _parse_objects(value, answer_format)
        if parsed is None:
            return ParsedAnswer(error=f"expected a JSON {shape.removeprefix('a ').removeprefix('an ')}, "
                                      f"got {type(value).__name__}")
        return ParsedAnswer([parsed[0]], invalid_objects=parsed[1])
    if not isinstance(value, dict):
        return ParsedAnswer(error=f"expected a JSON object keyed {image_key(prefix, 0)}..., got {type(value).__name__}")
    images, bad = [], 0
    for i in range(n_images):
        key = image_key(prefix, i)
        parsed = _parse_objects(value.get(key), answer_format)
        if parsed is None:
            return ParsedAnswer(error=f"{key}: missing or not {shape}")
        images.append(parsed[0])
        bad += parsed[1]
    return ParsedAnswer(images, invalid_objects=bad)


def parse_summaries(text: str, n_images: int, prefix: str) -> tuple[list[str] | None, str | None]:
    """Summaries of a Stage-A answer (plain text for one image, JSON keyed per image for several), or an error.

    An empty summary is an error: a summary must say something.
    """
    if n_images == 1:
        s = text.strip()
        return ([s], None) if s else (None, "empty summary")
    try:
        value = parse_json(text.strip())
    except JsonTextError as e:
        return None, f"not JSON ({_where(e)})"
    if not isinstance(value, dict):
        return None, f"expected a JSON object keyed {image_key(prefix, 0)}..., got {type(value).__name__}"
    out = []
    for i in range(n_images):
        key = image_key(prefix, i)
        s = value.get(key)
        if not isinstance(s, str) or not s.strip():
            return None, f"{key}: missing or empty summary"
        out.append(s.strip())
    return out, None


def to_geometry(obj: ParsedObject, coords: AnswerCoords) -> Geometry:
    """A parsed object in pixel coordinates of the image (`coords.decode`)."""
    return from_coords(obj.key, coords.decode(obj.values))

"""Record formats: the one in-memory record type (`Conversation`) and how each on-disk record becomes one.

A record format is a registered `RecordFormat` (`@RECORD_FORMATS.register("name")`): `detect(record)` says
whether a parsed record looks like the format (for `format: auto`), `convert(record, resolve)` turns it into
the pieces of a `Conversation` or raises `BadRecord` naming the field and the reason. Formats are pure: file
handling, sampling, the bad-record policy and the image header check live in `arctic_vl.data.sources`, and
the conversation rules every format shares (roles, turns, `<image>` placement) in `arctic_vl.data.encoding`,
which the reader applies to whatever a format returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

from arctic_vl.data.bad_records import (
    GEOMETRY_OUT_OF_RANGE,
    GROUNDING_MISMATCH,
    MALFORMED_RECORD,
    MALFORMED_TURNS,
    MISSING_FIELD,
    BadRecord,
)
from arctic_vl.data.images import ImageRef
from arctic_vl.registry import RECORD_FORMATS

#: how a record marks the position of one image in its text (each family's encoder expands it)
IMAGE_TOKEN = "<image>"
#: the roles of a Conversation's messages
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}
GEOMETRY_KEYS = ("bbox_2d", "poly", "quad", "line")
#: numbers a geometry needs: exactly (bbox_2d, quad) or at least (poly, line), and the point count for messages
_GEOMETRY_ARITY = {"bbox_2d": (4, True), "poly": (6, False), "quad": (8, True), "line": (4, False)}
#: ms-swift's grounding placeholders: each `REF_TOKEN` takes the next `objects.ref`, each `BBOX_TOKEN` the next
#: `objects.bbox`, in the family's convention (`arctic_vl.data.encoding.render_grounding`)
REF_TOKEN, BBOX_TOKEN = "<ref-object>", "<bbox>"
#: placeholders that must not reach the tokenizer: ms-swift's tags other than `<image>` (counted against the
#: images) and `<video>` (refused as unsupported). A record still holding one after rendering is a bad record.
PLACEHOLDERS = (REF_TOKEN, BBOX_TOKEN, "<audio>", "<cot-process>", "<start-image>")
#: `meta` key of a record's parsed ms-swift `objects` (see `parse_grounding`)
GROUNDING_KEY = "grounding"
#: ms-swift's `objects.bbox_type`: `real` pixels of the image (default), `norm1` in [0, 1], `norm1000` in [0, 1000]
BBOX_TYPES = {"real": None, "norm1": 1, "norm1000": 1000}
DENSE_PROMPT = "Describe every object with its location."


@dataclass
class Conversation:
    """One training sample: chat turns with `<image>` placeholders and the images they stand for.

    `messages` are {role: system|user|assistant, content: str}, with exactly one `IMAGE_TOKEN` per image, in
    order. `image_sizes` are the (width, height) of the images, read from their headers when the source was
    read (None when the reader did not check images). `index` is the record's index in its file, `line` its
    1-based line where the file has lines. Records may be shared between repeats of a weighted source: treat
    them as read-only.
    """

    messages: list[dict[str, str]]
    images: list[ImageRef]
    source: str
    index: int
    meta: dict[str, Any] = field(default_factory=dict)
    image_sizes: list[tuple[int, int]] | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        """`record N` or `record N (line L)`: how messages name the record within its source."""
        return f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")

    @property
    def has_image(self) -> bool:
        """Whether the sample carries at least one image (text-only samples do not)."""
        return bool(self.images)


#: the callback a format's `convert` resolves each raw image value with: (raw value, field path) -> ImageRef.
#: It accepts a path string (relative to the file or `image_root`), a {"bytes"|"path"} dict or an ImageRef,
#: and raises BadRecord for anything else.
ResolveImage = Callable[[Any, str], ImageRef]
Converted = tuple[list[dict[str, str]], list[ImageRef], dict[str, Any]]


class RecordFormat:
    """Base of every record format (`@RECORD_FORMATS.register("name")` on a subclass; no config class).

    Contract: the reader makes an instance (no arguments) for each file it reads and calls
    - `detect(record) -> bool` on the first parsed records of a `format: auto` source (any JSON value: check
      its type); the registered formats are asked in order, the built-in ones first, and the first that says
      yes reads the whole file. It must not raise.
    - `convert(record, resolve) -> (messages, images, meta)` once per sampled record: `messages` a list of
      {role, content} (roles system/user/assistant; `IMAGE_TOKEN` marks where each image goes, or none at all
      to have them put at the start of the first user turn), `images` the ImageRefs `resolve(value, field)`
      gave, in order, `meta` the record's other fields (kept on the Conversation). A record it cannot use is a
      `BadRecord(reason, field, detail)`; the reader then applies `on_bad_record` (error: exit 2 naming file,
      record, line, field; skip: counted by reason).
    The reader then checks the messages (`arctic_vl.data.encoding.prepare_messages`, errors at
    `messages_field`) and each image's header, like for every format.
    """

    #: the record field that errors about the conversation as a whole (turns, `<image>` count) name
    messages_field: ClassVar[str] = "messages"
    #: what `detect` looks for, for the message when no format matches (e.g. "a 'messages' list")
    looks_like: ClassVar[str] = ""
    #: reasons of this format beyond BAD_RECORD_REASONS (a BadRecord with an undeclared reason is a bug)
    reasons: ClassVar[tuple[str, ...]] = ()
    registered_name: ClassVar[str] = ""

    def detect(self, record: Any) -> bool:
        """Whether a parsed record looks like this format."""
        raise NotImplementedError

    def convert(self, record: Any, resolve: ResolveImage) -> Converted:
        """One record as (messages, images, meta); BadRecord when it cannot be used."""
        raise NotImplementedError


RECORD_FORMATS.bind_base(RecordFormat)

#: the core's formats, asked first by auto-detection, in this order
BUILTIN_FORMATS = ("llava", "messages", "dense_caption")


def record_format_names() -> list[str]:
    """The registered record formats: the core's (in detection order), then the plugins' sorted by name."""
    return [*BUILTIN_FORMATS, *(n for n in RECORD_FORMATS.names() if n not in BUILTIN_FORMATS)]


def record_format(name: str) -> RecordFormat:
    """An instance of the record format registered as `name`; ConfigError listing the registered ones otherwise."""
    return RECORD_FORMATS.get(name)()


def detect_record_format(records: list[Any]) -> str | None:
    """The first registered format (in `record_format_names` order) that one of `records` looks like, asking
    record by record; None when none matches."""
    formats = [(name, record_format(name)) for name in record_format_names()]
    for record in records:
        for name, fmt in formats:
            if fmt.detect(record):
                return name
    return None


def _require(record: dict, key: str) -> Any:
    if key not in record:
        raise BadRecord(MISSING_FIELD, key, f"required field is missing (fields present: {sorted(record)})")
    return record[key]


def _image_list(value: Any, key: str, resolve: ResolveImage, *, allow_str: bool) -> list[ImageRef]:
    """A field holding one image (str, when allowed) or a list of images, resolved in order."""
    if value is None:
        return []
    if allow_str and isinstance(value, str):
        return [resolve(value, key)]
    if not isinstance(value, list):
        allowed = "a string or a list" if allow_str else "a list"
        raise BadRecord(MALFORMED_RECORD, key, f"must be {allowed} of images, got {type(value).__name__}")
    return [resolve(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _extras(record: dict, used: tuple[str, ...]) -> dict[str, Any]:
    """Top-level fields a format does not consume (id, qtype, ...), kept in `meta`."""
    return {k: v for k, v in record.items() if k not in used}


class TurnsFormat(RecordFormat):
    """A record holding a list of turns (`messages_field`) and an image field: what the LLaVA and messages
    formats share. Subclasses name the keys; `roles` maps the format's role names (None: taken as given)."""

    role_key: ClassVar[str] = "role"
    content_key: ClassVar[str] = "content"
    roles: ClassVar[dict[str, str] | None] = None
    images_key: ClassVar[str] = "images"
    reasons = (GEOMETRY_OUT_OF_RANGE,)  # an ms-swift grounding box outside its range (`parse_grounding`)
    #: whether the image field may hold one path string instead of a list
    single_image_str: ClassVar[bool] = False

    def detect(self, record: Any) -> bool:
        """A JSON object with the turns field."""
        return isinstance(record, dict) and self.messages_field in record

    def convert(self, record: Any, resolve: ResolveImage) -> Converted:
        """(messages, images, meta); meta holds the fields other than the turns and the images, an ms-swift
        grounding `objects` mapping parsed under `GROUNDING_KEY` (`parse_grounding`). An `objects` list is another
        schema's (a project's detection boxes): kept in meta as it is; a placeholder left in the text is refused
        when it is encoded."""
        messages = self._turns(record)
        images = _image_list(record.get(self.images_key), self.images_key, resolve, allow_str=self.single_image_str)
        if not isinstance(record.get("objects"), dict):
            return messages, images, _extras(record, (self.images_key, self.messages_field))
        meta = _extras(record, (self.images_key, self.messages_field, "objects"))
        meta[GROUNDING_KEY] = parse_grounding(record["objects"], messages, len(images), self.messages_field)
        return messages, images, meta

    def _turns(self, record: Any) -> list[dict[str, Any]]:
        key, role_key, content_key = self.messages_field, self.role_key, self.content_key
        if not isinstance(record, dict):
            raise BadRecord(MALFORMED_RECORD, "<record>", f"must be an object, got {type(record).__name__}")
        turns = _require(record, key)
        if not isinstance(turns, list):
            raise BadRecord(MALFORMED_TURNS, key, f"must be a list, got {type(turns).__name__}")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or role_key not in t or content_key not in t:
                raise BadRecord(MALFORMED_TURNS, f"{key}[{i}]", f"each turn needs '{role_key}' and '{content_key}'")
            role = t[role_key]
            if self.roles is not None:
                role = self.roles.get(role) if isinstance(role, str) else None
                if role is None:
                    raise BadRecord(MALFORMED_TURNS, f"{key}[{i}].{role_key}",
                                    f"unknown role {t[role_key]!r} (allowed: human, gpt, system)")
            messages.append({"role": role, "content": t[content_key]})
        return messages


def _count(messages: list[dict[str, Any]], token: str) -> int:
    return sum(m["content"].count(token) for m in messages if isinstance(m.get("content"), str))


def _check_boxes(boxes: list[Any], bbox_type: str) -> None:
    """Each box [x1, y1, x2, y2] or point [x, y] of finite numbers, in [0, scale] of its `bbox_type`."""
    scale = BBOX_TYPES[bbox_type]
    for i, box in enumerate(boxes):
        where = f"objects.bbox[{i}]"
        if not isinstance(box, list) or len(box) not in (2, 4) or not all(is_coordinate(v) for v in box):
            raise BadRecord(MALFORMED_RECORD, where, f"must be [x1, y1, x2, y2] or a point [x, y] of finite numbers, "
                            f"got {box!r:.80}")
        if min(box) < 0 or (scale is not None and max(box) > scale):
            raise BadRecord(GEOMETRY_OUT_OF_RANGE, where, f"{box} is outside [0, {scale if scale else 'the image'}]"
                            f" (bbox_type {bbox_type})")


def parse_grounding(objects: Any, messages: list[dict[str, Any]], n_images: int,
                    messages_field: str = "messages") -> dict[str, Any]:
    """ms-swift's grounding `objects` of one record, checked: {ref, bbox, bbox_type, image_id}.

    `ref`: strings, one per `<ref-object>` of the messages, in order; `bbox`: boxes [x1, y1, x2, y2] or points
    [x, y] (finite numbers), one per `<bbox>`; `bbox_type`: `real` (pixels of the image, the default), `norm1`
    (in [0, 1]) or `norm1000` (in [0, 1000], already normalised); `image_id`: per box, the index of the image it
    is on (default 0). BadRecord `malformed_record` naming the field, or `grounding_mismatch` when a placeholder
    count differs from its list.
    """
    if not isinstance(objects, dict):
        raise BadRecord(MALFORMED_RECORD, "objects", "ms-swift grounding objects must be an object {ref: [...], "
                        f"bbox: [[...]], bbox_type?, image_id?}}, got {type(objects).__name__}")
    unknown = sorted(set(objects) - {"ref", "bbox", "bbox_type", "image_id"})
    if unknown:
        raise BadRecord(MALFORMED_RECORD, "objects", f"unknown keys {unknown} (allowed: ref, bbox, bbox_type, "
                        "image_id)")
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise BadRecord(MALFORMED_RECORD, "objects.ref", "must be a list of strings")
    if not isinstance(boxes, list):
        raise BadRecord(MALFORMED_RECORD, "objects.bbox", f"must be a list of boxes, got {type(boxes).__name__}")
    bbox_type = objects.get("bbox_type") or "real"
    if bbox_type not in BBOX_TYPES:
        raise BadRecord(MALFORMED_RECORD, "objects.bbox_type", f"{bbox_type!r}; allowed: {', '.join(BBOX_TYPES)}")
    _check_boxes(boxes, bbox_type)
    if boxes and n_images == 0:  # its size scales the box (and a resized image's, for pixel families)
        raise BadRecord(MALFORMED_RECORD, "objects.bbox", "boxes need the image they are on; the record has none")
    image_ids = objects.get("image_id")
    image_ids = [0] * len(boxes) if image_ids is None else image_ids
    if (not isinstance(image_ids, list) or len(image_ids) != len(boxes)
            or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < n_images for k in image_ids)):
        raise BadRecord(MALFORMED_RECORD, "objects.image_id", f"must list, per box, the index of its image "
                        f"(0..{n_images - 1}), got {image_ids!r:.80}")
    for token, values, name in ((REF_TOKEN, refs, "ref"), (BBOX_TOKEN, boxes, "bbox")):
        n = _count(messages, token)
        if n != len(values):
            raise BadRecord(GROUNDING_MISMATCH, messages_field, f"{n} {token} placeholders for {len(values)} "
                            f"objects.{name} entries (each {token} takes the next one, in order)")
    return {"ref": list(refs), "bbox": [list(b) for b in boxes], "bbox_type": bbox_type, "image_id": list(image_ids)}


@RECORD_FORMATS.register("llava")
class LlavaFormat(TurnsFormat):
    """A LLaVA record: `image` (a path or a list of paths), `conversations` of {from: human|gpt|system, value}."""

    messages_field = "conversations"
    looks_like = "a 'conversations' field"
    role_key, content_key, roles = "from", "value", LLAVA_ROLES
    images_key, single_image_str = "image", True


@RECORD_FORMATS.register("messages")
class MessagesFormat(TurnsFormat):
    """A messages record (ms-swift / OpenAI style): `messages` of {role, content}, optional `images` list."""

    messages_field = "messages"
    looks_like = "a 'messages' field"


def is_coordinate(v: Any) -> bool:
    """Whether `v` can be a coordinate: an int or float (not a bool) that is finite as a float (NaN, inf and an
    integer too large for a float are not)."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float (e.g. 400 digits): no pixel coordinate
        return False


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def _on_segment(p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether `p`, collinear with a-b, lies on the closed segment a-b."""
    return min(a[0], b[0]) <= p[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= p[1] <= max(a[1], b[1])


def segments_meet(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float],
                  d: tuple[float, float]) -> bool:
    """Whether the closed segments a-b and c-d share a point (crossing, touching or overlapping)."""
    d1, d2, d3, d4 = _cross(c, d, a), _cross(c, d, b), _cross(a, b, c), _cross(a, b, d)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return ((d1 == 0 and _on_segment(a, c, d)) or (d2 == 0 and _on_segment(b, c, d))
            or (d3 == 0 and _on_segment(c, a, b)) or (d4 == 0 and _on_segment(d, a, b)))


def polygon_problem(coords: list[float]) -> str | None:
    """Why the polygon [x1, y1, x2, y2, ...] is no simple polygon with an area (None when it is one): its edges
    cross or touch other than at a shared corner, an edge doubles back over the previous one, or its area is 0.
    Repeated consecutive points (and a last point equal to the first) are allowed and ignored."""
    points: list[tuple[float, float]] = []
    for x, y in zip(coords[0::2], coords[1::2]):
        if not points or points[-1] != (x, y):
            points.append((x, y))
    if len(points) > 1 and points[-1] == points[0]:
        points.pop()
    n = len(points)
    area2 = sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1] for i in range(n))
    if n < 3 or area2 == 0:
        return f"encloses no area ({n} distinct points)"
    edges = [(points[i], points[(i + 1) % n]) for i in range(n)]
    for i, (a, b) in enumerate(edges):
        c = edges[(i + 1) % n][1]
        if _cross(a, b, c) == 0 and (b[0] - a[0]) * (c[0] - b[0]) + (b[1] - a[1]) * (c[1] - b[1]) < 0:
            return f"doubles back on itself at point {(i + 1) % n} {list(b)}"
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:  # the closing edge shares point 0 with the first
                continue
            if segments_meet(a, b, *edges[j]):
                return f"is self-intersecting: edge {i} ({list(a)} -> {list(b)}) meets edge {j} " \
                       f"({list(edges[j][0])} -> {list(edges[j][1])})"
    return None


def check_dense_object(obj: Any, width: int, height: int, field_name: str) -> dict[str, Any]:
    """One dense-caption object: exactly one geometry, a non-empty `desc`, coordinates in the image."""
    if not isinstance(obj, dict):
        raise BadRecord(MALFORMED_RECORD, field_name, f"must be an object, got {type(obj).__name__}")
    keys = [k for k in GEOMETRY_KEYS if k in obj]
    if len(keys) != 1:
        raise BadRecord(MALFORMED_RECORD, field_name,
                        f"needs exactly one of {', '.join(GEOMETRY_KEYS)} (got {keys or 'none'})")
    key = keys[0]
    desc = obj.get("desc")
    if not isinstance(desc, str) or not desc.strip():
        raise BadRecord(MALFORMED_RECORD, f"{field_name}.desc", "must be a non-empty string")
    coords = obj[key]
    where = f"{field_name}.{key}"
    if not isinstance(coords, list) or not all(is_coordinate(c) for c in coords):
        raise BadRecord(MALFORMED_RECORD, where, "must be a list of finite numbers")
    need, exact = _GEOMETRY_ARITY[key]
    if exact and len(coords) != need:
        shape = "[x1, y1, x2, y2]" if key == "bbox_2d" else "[x1, y1, ..., x4, y4] (four corners)"
        raise BadRecord(MALFORMED_RECORD, where, f"needs {need} numbers {shape}, got {len(coords)}")
    if len(coords) % 2 or len(coords) < need:
        raise BadRecord(MALFORMED_RECORD, where,
                        f"needs an even count of at least {need} numbers, got {len(coords)}")
    xs, ys = coords[0::2], coords[1::2]
    if min(xs) < 0 or max(xs) > width or min(ys) < 0 or max(ys) > height:
        raise BadRecord(GEOMETRY_OUT_OF_RANGE, where, f"{coords} is outside [0, {width}] x [0, {height}]")
    if key == "bbox_2d" and not (coords[0] < coords[2] and coords[1] < coords[3]):
        raise BadRecord(GEOMETRY_OUT_OF_RANGE, where, f"{coords} needs x1 < x2 and y1 < y2")
    if key in ("poly", "quad") and (problem := polygon_problem(coords)) is not None:
        raise BadRecord(MALFORMED_RECORD, where, f"the polygon {problem}; a {key} must be a simple polygon "
                                                 "(edges meeting only at shared corners) with an area")
    out = {"desc": desc, key: list(coords)}
    return out


def to_norm1000(coords: list[float], width: int, height: int) -> list[int]:
    """Pixel coordinates [x, y, x, y, ...] -> integers in [0, 1000]: x * 1000 / width, y * 1000 / height.

    Rounds half up on the exact rational value: Python's round() is half-to-even on an inexact float,
    so 62.5 would become 62 while 63.5 becomes 64, and 1/W*1000 can land just under .5.
    """
    out = []
    for i, v in enumerate(coords):
        size = width if i % 2 == 0 else height
        if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
            rounded = (2000 * int(v) + size) // (2 * size)  # the same rounding in integers: no Fraction needed
        else:
            rounded = math.floor(Fraction(v) * 1000 / size + Fraction(1, 2))
        out.append(min(1000, max(0, rounded)))
    return out


def render_dense_answer(objects: list[dict[str, Any]], width: int, height: int) -> str:
    """The assistant answer: a compact JSON list of {"desc", geometry} with norm1000 coordinates."""
    rendered = []
    for obj in objects:
        key = next(k for k in GEOMETRY_KEYS if k in obj)
        rendered.append({"desc": obj["desc"], key: to_norm1000(obj[key], width, height)})
    return json.dumps(rendered, separators=(",", ":"), ensure_ascii=False)


def dense_messages(n_images: int, objects: list[dict[str, Any]], width: int, height: int) -> list[dict]:
    """The default dense-caption chat: images + DENSE_PROMPT, answered by `render_dense_answer`."""
    return [{"role": "user", "content": IMAGE_TOKEN * n_images + DENSE_PROMPT},
            {"role": "assistant", "content": render_dense_answer(objects, width, height)}]


@RECORD_FORMATS.register("dense_caption")
class DenseCaptionFormat(RecordFormat):
    """A dense-caption record: `images`, `width`, `height`, `objects` (a list, or an object keyed object_1, ...;
    each with one geometry, bbox_2d / poly / quad / line, and a `desc`), optional `summary`. The conversation
    asks for every object; the answer is `render_dense_answer`."""

    looks_like = "an 'objects' field"
    reasons = (GEOMETRY_OUT_OF_RANGE,)

    def detect(self, record: Any) -> bool:
        """A JSON object with an `objects` field."""
        return isinstance(record, dict) and "objects" in record

    def convert(self, record: Any, resolve: ResolveImage) -> Converted:
        """`meta` keeps the pixel-space objects, width, height and summary so augmentation can re-render."""
        if not isinstance(record, dict):
            raise BadRecord(MALFORMED_RECORD, "<record>", f"must be an object, got {type(record).__name__}")
        raw_images = _require(record, "images")
        width, height, objects = (_require(record, k) for k in ("width", "height", "objects"))
        for key, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise BadRecord(MALFORMED_RECORD, key, f"must be a positive integer, got {v!r}")
        if isinstance(objects, dict):  # the keyed form {"object_1": {...}, "object_2": {...}}, in its order
            fields = [f"objects.{k}" for k in objects]
            objects = list(objects.values())
        elif isinstance(objects, list):
            fields = [f"objects[{i}]" for i in range(len(objects))]
        else:
            raise BadRecord(MALFORMED_RECORD, "objects", f"must be a list of objects, or an object keyed "
                                                         f"object_1, object_2, ...; got {type(objects).__name__}")
        summary = record.get("summary")
        if summary is not None and not isinstance(summary, str):
            raise BadRecord(MALFORMED_RECORD, "summary", f"must be a string, got {type(summary).__name__}")
        parsed = [check_dense_object(o, width, height, f) for o, f in zip(objects, fields)]
        images = _image_list(raw_images, "images", resolve, allow_str=False)
        if not images:
            raise BadRecord(MALFORMED_RECORD, "images", "needs at least one image")
        meta = _extras(record, ("images", "width", "height", "objects", "summary"))
        meta.update(objects=parsed, width=width, height=height, summary=summary)
        return dense_messages(len(images), parsed, width, height), images, meta

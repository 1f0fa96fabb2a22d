"""The one in-memory record type (`Conversation`) and the converters from each on-disk record format.

The converters are pure: they take one parsed record (a dict) and a callback that turns a raw image
value into an `ImageRef` (and checks it), and either return the pieces of a `Conversation` or raise
`BadRecord` naming the field and the reason. File handling, sampling and the bad-record policy live in
`arctic_vl.data.sources`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from arctic_vl.data.images import MISSING_IMAGE, UNREADABLE_IMAGE, ImageRef

#: how a record marks the position of one image in its text (each family's encoder expands it)
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}
GEOMETRY_KEYS = ("bbox_2d", "poly", "line")
DENSE_PROMPT = "Describe every object with its location."

# Every reason a record can be rejected for; BadRecordReport counts by these.
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
MALFORMED_RECORD = "malformed_record"
MALFORMED_TURNS = "malformed_turns"
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
GEOMETRY_OUT_OF_RANGE = "geometry_out_of_range"
BAD_RECORD_REASONS = (INVALID_JSON, MISSING_FIELD, MALFORMED_RECORD, MALFORMED_TURNS, IMAGE_TOKEN_MISMATCH,
                      GEOMETRY_OUT_OF_RANGE, MISSING_IMAGE, UNREADABLE_IMAGE)


@dataclass
class Conversation:
    """One training sample: chat turns with `<image>` placeholders and the images they stand for.

    Records may be shared between repeats of a weighted source: treat them as read-only.
    """

    messages: list[dict[str, str]]
    images: list[ImageRef]
    source: str
    index: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        """Whether the sample carries at least one image (text-only samples do not)."""
        return bool(self.images)


class BadRecord(Exception):
    """A record that cannot become a Conversation; `field` is a path like `conversations[1].value`."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


ResolveImage = Callable[[Any, str], ImageRef]  # (raw value, field path) -> checked ImageRef


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


def check_turns(messages: list[dict[str, str]], field_name: str) -> None:
    """At least one user and one assistant turn, known roles, string contents; else BadRecord."""
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise BadRecord(MALFORMED_TURNS, f"{field_name}[{i}]", f"unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise BadRecord(MALFORMED_TURNS, f"{field_name}[{i}]",
                            f"content must be a string, got {type(m['content']).__name__}")
    roles = {m["role"] for m in messages}
    for needed in ("user", "assistant"):
        if needed not in roles:
            raise BadRecord(MALFORMED_TURNS, field_name, f"needs at least one {needed} turn")


def place_image_tokens(messages: list[dict[str, str]], n_images: int, field_name: str) -> None:
    """Make the `<image>` count match the images: none at all -> prepend them to the first user turn
    (the LLaVA convention); some but a different count -> BadRecord `image_token_mismatch`."""
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if count == n_images:
        return
    if count == 0:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_TOKEN}\n" * n_images + first_user["content"]
        return
    raise BadRecord(IMAGE_TOKEN_MISMATCH, field_name,
                    f"{count} {IMAGE_TOKEN} placeholders for {n_images} images")


def _extras(record: dict, used: tuple[str, ...]) -> dict[str, Any]:
    """Top-level fields a format does not consume (id, qtype, ...), kept in `meta`."""
    return {k: v for k, v in record.items() if k not in used}


def _read_turns(record: Any, key: str, role_key: str, content_key: str,
                roles: dict[str, str] | None) -> list[dict[str, str]]:
    """`record[key]` as messages; `roles` maps the format's role names (None: taken as given, checked later)."""
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
        if roles is not None:
            role = roles.get(role) if isinstance(role, str) else None
            if role is None:
                raise BadRecord(MALFORMED_TURNS, f"{key}[{i}].{role_key}",
                                f"unknown role {t[role_key]!r} (allowed: human, gpt, system)")
        messages.append({"role": role, "content": t[content_key]})
    check_turns(messages, key)
    return messages


def from_llava(record: Any, resolve: ResolveImage) -> tuple[list[dict[str, str]], list[ImageRef], dict]:
    """A LLaVA record (`image` str|list, `conversations` of {from, value}) -> (messages, images, meta)."""
    messages = _read_turns(record, "conversations", "from", "value", LLAVA_ROLES)
    images = _image_list(record.get("image"), "image", resolve, allow_str=True)
    place_image_tokens(messages, len(images), "conversations")
    return messages, images, _extras(record, ("image", "conversations"))


def from_messages(record: Any, resolve: ResolveImage) -> tuple[list[dict[str, str]], list[ImageRef], dict]:
    """A messages record (`messages` of {role, content}, `images` list) -> (messages, images, meta)."""
    messages = _read_turns(record, "messages", "role", "content", None)
    images = _image_list(record.get("images"), "images", resolve, allow_str=False)
    place_image_tokens(messages, len(images), "messages")
    return messages, images, _extras(record, ("messages", "images"))


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_dense_object(obj: Any, width: int, height: int, field_name: str) -> dict[str, Any]:
    """One dense-caption object: exactly one geometry, a non-empty `desc`, coordinates in the image."""
    if not isinstance(obj, dict):
        raise BadRecord(MALFORMED_RECORD, field_name, f"must be an object, got {type(obj).__name__}")
    keys = [k for k in GEOMETRY_KEYS if k in obj]
    if len(keys) != 1:
        raise BadRecord(MALFORMED_RECORD, field_name,
                        f"needs exactly one of bbox_2d, poly, line (got {keys or 'none'})")
    key = keys[0]
    desc = obj.get("desc")
    if not isinstance(desc, str) or not desc.strip():
        raise BadRecord(MALFORMED_RECORD, f"{field_name}.desc", "must be a non-empty string")
    coords = obj[key]
    where = f"{field_name}.{key}"
    if not isinstance(coords, list) or not all(_is_number(c) for c in coords):
        raise BadRecord(MALFORMED_RECORD, where, "must be a list of finite numbers")
    if key == "bbox_2d" and len(coords) != 4:
        raise BadRecord(MALFORMED_RECORD, where, f"needs 4 numbers [x1, y1, x2, y2], got {len(coords)}")
    min_points = {"bbox_2d": 2, "poly": 3, "line": 2}[key]
    if len(coords) % 2 or len(coords) < 2 * min_points:
        raise BadRecord(MALFORMED_RECORD, where,
                        f"needs an even count of at least {2 * min_points} numbers, got {len(coords)}")
    xs, ys = coords[0::2], coords[1::2]
    if min(xs) < 0 or max(xs) > width or min(ys) < 0 or max(ys) > height:
        raise BadRecord(GEOMETRY_OUT_OF_RANGE, where, f"{coords} is outside [0, {width}] x [0, {height}]")
    if key == "bbox_2d" and not (coords[0] < coords[2] and coords[1] < coords[3]):
        raise BadRecord(GEOMETRY_OUT_OF_RANGE, where, f"{coords} needs x1 < x2 and y1 < y2")
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


def from_dense_caption(record: Any, resolve: ResolveImage) -> tuple[list[dict[str, str]], list[ImageRef], dict]:
    """A dense-caption record (`images`, `width`, `height`, `objects`, optional `summary`).

    `meta` keeps the pixel-space objects, width, height and summary so augmentation can re-render.
    """
    if not isinstance(record, dict):
        raise BadRecord(MALFORMED_RECORD, "<record>", f"must be an object, got {type(record).__name__}")
    raw_images = _require(record, "images")
    width, height, objects = (_require(record, k) for k in ("width", "height", "objects"))
    for key, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise BadRecord(MALFORMED_RECORD, key, f"must be a positive integer, got {v!r}")
    if not isinstance(objects, list):
        raise BadRecord(MALFORMED_RECORD, "objects", f"must be a list, got {type(objects).__name__}")
    summary = record.get("summary")
    if summary is not None and not isinstance(summary, str):
        raise BadRecord(MALFORMED_RECORD, "summary", f"must be a string, got {type(summary).__name__}")
    parsed = [check_dense_object(o, width, height, f"objects[{i}]") for i, o in enumerate(objects)]
    images = _image_list(raw_images, "images", resolve, allow_str=False)
    if not images:
        raise BadRecord(MALFORMED_RECORD, "images", "needs at least one image")
    meta = _extras(record, ("images", "width", "height", "objects", "summary"))
    meta.update(objects=parsed, width=width, height=height, summary=summary)
    return dense_messages(len(images), parsed, width, height), images, meta


CONVERTERS: dict[str, Callable[[Any, ResolveImage], tuple[list[dict[str, str]], list[ImageRef], dict]]] = {
    "llava": from_llava,
    "messages": from_messages,
    "dense_caption": from_dense_caption,
}


def detect_record_format(record: Any) -> str | None:
    """The format a parsed record looks like, from its keys; None when it matches none."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "llava"
    if "messages" in record:
        return "messages"
    if "objects" in record:
        return "dense_caption"
    return None

"""The teacher/student detection record and its checks (pure functions, no files).

One JSONL line::

    {"images": ["t0.png", "s.png"],
     "messages": [{"role": "user", "content": "<image>\\nDescribe the objects."},
                  {"role": "assistant", "content": "red circle, blue square"},   # teacher example
                  {"role": "user", "content": "<image>\\nDescribe the objects."},
                  {"role": "assistant", "content": "green triangle"}],          # the student turn
     "objects": [{"bbox_2d": [12, 30, 40, 58], "desc": "green triangle"}]}

It is a messages record (`messages`, `images`) plus `objects`: the ground-truth boxes of the LAST image (the
student image), in pixels of that image as stored on disk, `[x1, y1, x2, y2]` with 0 <= x1 < x2 <= width and
0 <= y1 < y2 <= height, each with a non-empty `desc` (what the caption decoder learns). Every assistant turn
but the last is a teacher span, the last is the student span. An empty `objects` list is a valid negative.
"""

from __future__ import annotations

from typing import Any

from arctic_vl import (
    MALFORMED_RECORD,
    MISSING_FIELD,
    RECORD_FORMATS,
    BadRecord,
    DataError,
    RecordFormat,
    image_size,
    is_coordinate,
)

#: this format's own reasons (BadRecordReport counts by these names); the others are the core's
GEOMETRY_OUT_OF_RANGE = "geometry_out_of_range"
TOO_MANY_OBJECTS = "too_many_objects"


def check_detection_objects(objects: Any, width: int, height: int, *, max_objects: int | None = None,
                            field: str = "objects") -> list[dict[str, Any]]:
    """The record's `objects` as `[{"bbox_2d": [x1, y1, x2, y2], "desc": str}]` (pixels), or `BadRecord`
    naming the field (`objects[2].bbox_2d`) and what is allowed. `max_objects`: the head's query count."""
    if objects is None:
        raise BadRecord(MISSING_FIELD, field, "required: the student image's boxes (a list, [] for none)")
    if not isinstance(objects, list):
        raise BadRecord(MALFORMED_RECORD, field, f"must be a list of {{bbox_2d, desc}}, got {type(objects).__name__}")
    if max_objects is not None and len(objects) > max_objects:
        raise BadRecord(TOO_MANY_OBJECTS, field, f"{len(objects)} objects but the head has {max_objects} queries "
                        "(model.detection.num_queries): every object needs its own query")
    out = []
    for i, obj in enumerate(objects):
        where = f"{field}[{i}]"
        if not isinstance(obj, dict):
            raise BadRecord(MALFORMED_RECORD, where, f"must be an object {{bbox_2d, desc}}, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"bbox_2d", "desc"})
        if unknown:
            raise BadRecord(MALFORMED_RECORD, where, f"unknown key(s) {unknown}; allowed: bbox_2d, desc")
        desc = obj.get("desc")
        if not isinstance(desc, str) or not desc.strip():
            raise BadRecord(MALFORMED_RECORD, f"{where}.desc", "must be a non-empty string")
        box = obj.get("bbox_2d")
        if box is None:
            raise BadRecord(MISSING_FIELD, f"{where}.bbox_2d", "required: [x1, y1, x2, y2] in pixels")
        if not isinstance(box, list) or len(box) != 4 or not all(is_coordinate(v) for v in box):
            raise BadRecord(MALFORMED_RECORD, f"{where}.bbox_2d",
                            f"must be 4 finite numbers [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise BadRecord(GEOMETRY_OUT_OF_RANGE, f"{where}.bbox_2d",
                            f"{box} needs 0 <= x1 < x2 <= {width} and 0 <= y1 < y2 <= {height} (the student image)")
        out.append({"bbox_2d": [float(v) for v in box], "desc": desc.strip()})
    return out


def check_detection_record(messages: list[dict[str, str]], n_images: int, objects: Any, width: int, height: int,
                           *, max_objects: int | None = None) -> list[dict[str, Any]]:
    """A converted messages record (its messages and image count) plus its raw `objects`: the checked objects.

    A detection record needs at least one image (the last is the student image) and its last turn must be
    the assistant's (the student span)."""
    if n_images < 1:
        raise BadRecord(MALFORMED_RECORD, "images", "needs at least one image: the last one is the student image")
    if not messages or messages[-1].get("role") != "assistant":
        raise BadRecord(MALFORMED_RECORD, "messages", "the last turn must be the assistant's (the student answer)")
    return check_detection_objects(objects, width, height, max_objects=max_objects)


@RECORD_FORMATS.register("bbu_detection")
class DetectionRecordFormat(RecordFormat):
    """`format: bbu_detection`: a messages record whose `objects` are checked against its last image when read.

    (Auto-detection reads such files as `messages`, asked first; the `bbu_detection` data factory reads its
    `auto` sources with this format, and checks a plain messages record's objects the same way.)"""

    messages_field = "messages"
    looks_like = "a 'messages' list and an 'objects' list"
    reasons = (GEOMETRY_OUT_OF_RANGE, TOO_MANY_OBJECTS)

    def detect(self, record: Any) -> bool:
        """A JSON object with `messages` and `objects`."""
        return isinstance(record, dict) and "messages" in record and "objects" in record

    def convert(self, record: Any, resolve: Any) -> tuple[list[dict[str, str]], list[Any], dict[str, Any]]:
        """The messages format's conversion, then the objects checked; meta gets them and the student image size."""
        messages, images, meta = RECORD_FORMATS.get("messages")().convert(record, resolve)
        if not images:
            raise BadRecord(MALFORMED_RECORD, "images", "needs at least one image: the last one is the student image")
        try:
            width, height = image_size(images[-1])
        except DataError as e:
            raise BadRecord(e.reason or MALFORMED_RECORD, f"images[{len(images) - 1}]", str(e)) from None
        objects = check_detection_record(messages, len(images), record.get("objects"), width, height)
        return messages, images, {**meta, "objects": objects, "student_size": (width, height)}

"""Both origin documents' shapes: the October `quad` and the November keyed objects, in records and answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dense_caption.answers import parse_dense_answer, render_answer

from arctic_vl import DataError, to_norm1000

from .test_data import _build, _decode_answer, _records, _write


def _quad_records(shapes: Path) -> list[dict]:
    records = _records(shapes, 6)
    records[1]["objects"] = [{"desc": "tilted plate", "quad": [10, 10, 50, 12, 48, 40, 12, 38]}]
    # the keyed form of a record's objects: read in key order
    records[2]["objects"] = {f"object_{i + 1}": o for i, o in enumerate(records[2]["objects"])}
    return records


def _at(data, index: int) -> int:
    """The item of the record at `index` in the file (the reader shuffles the mix)."""
    return next(k for k, r in enumerate(data.train.records) if r.index == index)


def test_quad_and_keyed_records_are_read(tmp_path, shapes, tiny_qwen2) -> None:
    records = _quad_records(shapes)
    src = _write(tmp_path, shapes, records)
    data, bundle = _build(tmp_path, tiny_qwen2, {"sources": [str(src)], "object_order": "record"})
    (quad, desc), = data.train.records[_at(data, 1)].objects
    assert quad.key == "quad" and quad.coords() == [10, 10, 50, 12, 48, 40, 12, 38] and desc == "tilted plate"
    assert json.loads(_decode_answer(bundle, data.train[_at(data, 1)])) == [
        {"quad": to_norm1000([10, 10, 50, 12, 48, 40, 12, 38], 64, 64), "desc": "tilted plate"}]
    keyed = list(records[2]["objects"].values())
    assert [d for _, d in data.train.records[_at(data, 2)].objects] == [o["desc"] for o in keyed]


def test_quad_survives_augmentation_as_a_polygon(tmp_path, shapes, tiny_qwen2) -> None:
    """hflip on a 64-wide image: x -> 64 - x, still four corners, still a quad."""
    src = _write(tmp_path, shapes, _quad_records(shapes))
    aug = {"enabled": True, "ops": [{"name": "hflip", "params": {"prob": 1.0}}]}
    data, bundle = _build(tmp_path, tiny_qwen2, {"sources": [str(src)], "augmentation": aug,
                                                "object_order": "record"})
    flipped = [54, 10, 14, 12, 16, 40, 52, 38]
    assert json.loads(_decode_answer(bundle, data.train[_at(data, 1)])) == [
        {"quad": to_norm1000(flipped, 64, 64), "desc": "tilted plate"}]


@pytest.mark.parametrize("bad,field,message", [
    ({"desc": "q", "quad": [10, 10, 50, 12, 48, 40]}, "objects[0].quad",
     "needs 8 numbers [x1, y1, ..., x4, y4] (four corners), got 6"),
    ({"desc": "q", "quad": [10, 10, 50, 12, 48, 40, 12, "x"]}, "objects[0].quad", "must be a list of finite numbers"),
    ({"desc": "q", "quad": [10, 10, 50, 40, 50, 10, 10, 30]}, "objects[0].quad", "is self-intersecting"),
    ({"desc": "q", "quad": [10, 10, 50, 12, 48, 40, 12, 80]}, "objects[0].quad", "is outside [0, 64] x [0, 64]"),
])
def test_bad_quads_name_file_line_and_field(tmp_path, shapes, tiny_qwen2, bad, field, message) -> None:
    records = _records(shapes, 6)
    records[4]["objects"] = [bad]
    src = _write(tmp_path, shapes, records)
    with pytest.raises(DataError) as e:
        _build(tmp_path, tiny_qwen2, {"sources": [str(src)]})
    text = str(e.value)
    assert "dense.jsonl" in text and "line 5" in text and field in text and message in text, text


def test_non_finite_and_keyed_errors_name_the_line(tmp_path, shapes, tiny_qwen2) -> None:
    records = _records(shapes, 6)
    src = _write(tmp_path, shapes, records)
    lines = src.read_text().splitlines()
    lines[3] = lines[3].replace('"objects": [', '"objects": [{"desc": "nan", "quad": [1, 1, 9, 1, 9, NaN, 1, 9]}, ', 1)
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        _build(tmp_path, tiny_qwen2, {"sources": [str(src)]})
    assert "line 4" in str(e.value) and "finite" in str(e.value), str(e.value)
    records = _records(shapes, 6)
    records[2]["objects"] = {"object_1": {"desc": "box", "bbox_2d": [10, 10, 5, 20]}}
    (tmp_path / "keyed").mkdir()
    src = _write(tmp_path / "keyed", shapes, records)
    with pytest.raises(DataError, match=r"line 3.*objects\.object_1\.bbox_2d.*needs x1 < x2"):
        _build(tmp_path / "keyed", tiny_qwen2, {"sources": [str(src)]})


def test_keyed_answer_format_renders_and_parses(tmp_path, shapes, tiny_qwen2) -> None:
    """`answer_format: keyed`: {"object_1": {...}, ...}; several images keyed per image, then per object."""
    src = _write(tmp_path, shapes, _records(shapes))
    data, bundle = _build(tmp_path, tiny_qwen2, {"sources": [str(src)], "object_order": "record",
                                                "answer_format": "keyed"})
    rec = data.train.records[0]
    answer = _decode_answer(bundle, data.train[0])
    assert json.loads(answer) == {f"object_{i + 1}": {g.key: to_norm1000(g.coords(), 64, 64), "desc": d}
                                  for i, (g, d) in enumerate(rec.objects)}
    parsed = parse_dense_answer(answer, 1, "image_", "keyed")
    assert parsed.ok and [o.desc for o in parsed.images[0]] == [d for _, d in rec.objects]
    # a list answer is not the keyed format (and the other way round): a parse failure, counted as such
    assert not parse_dense_answer('[{"bbox_2d":[1,2,3,4],"desc":"a"}]', 1, "image_", "keyed").ok
    assert not parse_dense_answer(answer, 1, "image_", "list").ok
    two = render_answer([[{"bbox_2d": [1, 2, 3, 4], "desc": "a"}], []], "image_", "keyed")
    assert two == '{"image_1":{"object_1":{"bbox_2d":[1,2,3,4],"desc":"a"}},"image_2":{}}'
    back = parse_dense_answer(two, 2, "image_", "keyed")
    assert back.ok and [len(i) for i in back.images] == [1, 0] and back.images[0][0].values == [1.0, 2.0, 3.0, 4.0]
    quad = parse_dense_answer('{"object_1":{"quad":[1,1,9,1,9,9,1,9],"desc":"q"},"object_2":{"quad":[1,1],'
                              '"desc":"short"}}', 1, "image_", "keyed")
    assert quad.ok and quad.images[0][0].key == "quad" and quad.invalid_objects == 1


def test_make_stage_data_reads_keyed_records(tmp_path) -> None:
    """make-stage-data takes the keyed form as training does: the circle in object_2 makes the group pass."""
    from dense_caption.inference import make_stage_data

    keyed = {"object_1": {"desc": "red square", "bbox_2d": [0, 0, 4, 4]},
             "object_2": {"desc": "blue circle", "bbox_2d": [4, 4, 8, 8]}}
    lines = [{"images": ["a.png"], "width": 8, "height": 8, "objects": keyed, "summary": "square, circle"},
             {"images": ["b.png"], "width": 8, "height": 8, "objects": {"object_1": keyed["object_1"]},
              "summary": "square"}]
    src = tmp_path / "dense.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = make_stage_data(src, tmp_path / "out", group_size=1, seed=0)
    verdicts = sorted(json.loads(x)["verdict"] for x in (tmp_path / "out" / "groups.jsonl").read_text().splitlines())
    assert (result["groups"], verdicts) == (2, ["fail", "pass"])

"""The detection record checks, the synthetic writer, and the COCO metrics on known predictions."""

from __future__ import annotations

import json

import pytest
import torch
from bbu_detection.evaluation import coco_metrics, greedy_match
from bbu_detection.records import check_detection_objects, check_detection_record
from bbu_detection.synthetic import make_detection_data

from arctic_vl import BadRecord


@pytest.mark.parametrize(("objects", "field", "reason", "words"), [
    (None, "objects", "missing_field", "required"),
    ({"bbox_2d": [1, 2, 3, 4]}, "objects", "malformed_record", "must be a list"),
    ([{"bbox_2d": [1, 2, 3, 4]}], "objects[0].desc", "malformed_record", "non-empty string"),
    ([{"desc": "a"}], "objects[0].bbox_2d", "missing_field", "x1, y1, x2, y2"),
    ([{"desc": "a", "bbox_2d": [1, 2, 3]}], "objects[0].bbox_2d", "malformed_record", "4 finite numbers"),
    ([{"desc": "a", "bbox_2d": [1, 2, 3, float("nan")]}], "objects[0].bbox_2d", "malformed_record", "finite"),
    # issue 24 item 5: an integer too large for a float (was OverflowError from math.isfinite)
    ([{"desc": "a", "bbox_2d": [1, 1, int("9" * 400), 5]}], "objects[0].bbox_2d", "malformed_record", "finite"),
    ([{"desc": "a", "bbox_2d": [5, 2, 3, 4]}], "objects[0].bbox_2d", "geometry_out_of_range", "x1 < x2"),
    ([{"desc": "a", "bbox_2d": [1, 2, 70, 4]}], "objects[0].bbox_2d", "geometry_out_of_range", "<= 64"),
    ([{"desc": "a", "bbox_2d": [1, 2, 3, 4], "poly": [1]}], "objects[0]", "malformed_record", "unknown key"),
])
def test_bad_objects_name_field_and_reason(objects, field, reason, words):
    with pytest.raises(BadRecord) as info:
        check_detection_objects(objects, 64, 48)
    assert (info.value.field, info.value.reason) == (field, reason)
    assert words in info.value.detail


def test_good_objects_and_record_rules():
    good = check_detection_objects([{"bbox_2d": [0, 0, 64, 48], "desc": " red circle "}], 64, 48)
    assert good == [{"bbox_2d": [0.0, 0.0, 64.0, 48.0], "desc": "red circle"}]
    assert check_detection_objects([], 64, 48) == []
    with pytest.raises(BadRecord, match="3 objects but the head has 2 queries"):
        check_detection_objects([{"bbox_2d": [0, 0, 1, 1], "desc": "x"}] * 3, 64, 48, max_objects=2)
    msgs = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(BadRecord, match="needs at least one image"):
        check_detection_record(msgs, 0, [], 64, 48)
    with pytest.raises(BadRecord, match="last turn must be the assistant"):
        check_detection_record(msgs[:1], 1, [], 64, 48)


def test_synthetic_records(tmp_path):
    a = make_detection_data(tmp_path / "a", n=12, heldout=4, seed=3, image_size=64)
    b = make_detection_data(tmp_path / "b", n=12, heldout=4, seed=3, image_size=64)
    text = (tmp_path / "a" / "train.bbu.jsonl").read_text()
    assert text == (tmp_path / "b" / "train.bbu.jsonl").read_text()  # identical for a seed
    assert a["train"]["records"] == 12 and a["heldout"]["records"] == 4 and b["train"] == {
        **a["train"], "path": b["train"]["path"]}
    teachers = set()
    for line in text.splitlines():
        rec = json.loads(line)
        n_img = len(rec["images"])
        teachers.add(n_img - 1)
        assert 1 <= n_img <= 3 and len(rec["messages"]) == 2 * n_img
        assert (tmp_path / "a" / rec["images"][-1]).is_file()
        objects = check_detection_record(rec["messages"], n_img, rec["objects"], 64, 64)
        assert 1 <= len(objects) <= 3
        assert rec["messages"][-1]["content"] == ", ".join(o["desc"] for o in objects)
    assert teachers == {0, 1, 2}


def test_greedy_match_one_prediction_per_object():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 29.0, 30.0], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.99])
    # the higher-scored of the two on object 0 takes it; the far prediction matches nothing
    assert greedy_match(pred, scores, gt, 0.5) == [(1, 0), (2, 1)]


def test_coco_metrics_perfect_shifted_and_empty():
    gt = [[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 90.0, 80.0]]
    image = {"width": 100, "height": 100, "gt": gt}
    perfect = coco_metrics([{**image, "pred": gt, "scores": [0.9, 0.8]}] * 3)
    assert perfect == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0),
                       "AR100": pytest.approx(1.0)}
    # IoU of each prediction = 0.6: counted at 0.5, not at 0.75
    shifted = [[10.0, 10.0, 40.0, 40.0 / 0.6 - 10.0 / 0.6 + 10.0], [50.0, 50.0, 90.0, 50.0 + 30.0 * 0.6]]
    got = coco_metrics([{**image, "pred": shifted, "scores": [0.9, 0.8]}])
    assert got["AP50"] == pytest.approx(1.0) and got["AP75"] == 0.0 and 0 < got["AP"] < 0.5
    assert coco_metrics([{**image, "pred": [], "scores": []}]) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0}


def test_registered_record_format(tmp_path):
    from PIL import Image

    from arctic_vl import RECORD_FORMATS, load_plugins

    load_plugins()
    fmt = RECORD_FORMATS.get("bbu_detection")()
    Image.new("RGB", (64, 48)).save(tmp_path / "s.png")
    record = {"id": "a", "images": ["s.png"], "objects": [{"bbox_2d": [1, 2, 30, 40], "desc": "red circle"}],
              "messages": [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "x"}]}
    assert fmt.detect(record) and not fmt.detect({"messages": []})

    def resolve(value, field):
        return str(tmp_path / value)

    messages, images, meta = fmt.convert(record, resolve)
    assert images == [str(tmp_path / "s.png")] and messages[-1]["content"] == "x"
    assert meta == {"id": "a", "objects": [{"bbox_2d": [1.0, 2.0, 30.0, 40.0], "desc": "red circle"}],
                    "student_size": (64, 48)}
    bad = {**record, "objects": [{"bbox_2d": [1, 2, 30, 50], "desc": "red circle"}]}
    with pytest.raises(BadRecord, match=r"0 <= y1 < y2 <= 48") as info:
        fmt.convert(bad, resolve)
    assert info.value.reason in fmt.reasons

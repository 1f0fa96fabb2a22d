"""Matching and scores: IoU against shapely, Hungarian assignment, P/R/F1, parse failures counted."""

from __future__ import annotations

import math

import pytest
from dense_caption.answers import parse_dense_answer, parse_summaries
from dense_caption.geometry import Box, Polygon, Polyline
from dense_caption.metrics import DenseScores, box_iou, line_distance, match, polygon_iou
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon as SPolygon
from shapely.geometry import box as sbox

c = st.floats(0, 100)


@st.composite
def convex(draw: st.DrawFn) -> Polygon:
    cx, cy, r = draw(c), draw(c), draw(st.floats(2, 40))
    n = draw(st.integers(3, 8))
    angles = sorted(draw(st.lists(st.floats(0, 2 * math.pi, exclude_max=True), min_size=n, max_size=n, unique=True)))
    pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]  # on a circle: convex
    from hypothesis import assume

    assume(SPolygon(pts).is_valid and SPolygon(pts).area > 1e-3)
    return Polygon(tuple(pts))


@settings(max_examples=80, deadline=None)
@given(convex(), convex())
def test_polygon_iou_equals_shapely(a: Polygon, b: Polygon) -> None:
    sa, sb = SPolygon(a.points), SPolygon(b.points)
    expect = sa.intersection(sb).area / sa.union(sb).area
    assert polygon_iou(a, b) == pytest.approx(expect, rel=1e-6, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(c, c, st.floats(1, 50), st.floats(1, 50), c, c, st.floats(1, 50), st.floats(1, 50))
def test_box_iou_equals_shapely(x, y, w, h, x2, y2, w2, h2) -> None:
    a, b = Box(x, y, x + w, y + h), Box(x2, y2, x2 + w2, y2 + h2)
    sa, sb = sbox(*a.coords()), sbox(*b.coords())
    assert box_iou(a, b) == pytest.approx(sa.intersection(sb).area / sa.union(sb).area, rel=1e-9, abs=1e-12)


def test_concave_polygon_iou_is_rasterised_closely() -> None:
    ell = Polygon(((0, 0), (40, 0), (40, 10), (10, 10), (10, 40), (0, 40)))
    moved = Polygon(tuple((x + 3, y + 2) for x, y in ell.points))
    sa, sb = SPolygon(ell.points), SPolygon(moved.points)
    assert polygon_iou(ell, moved) == pytest.approx(sa.intersection(sb).area / sa.union(sb).area, abs=0.02)


def test_line_distance() -> None:
    a = Polyline(((0, 0), (10, 0)))
    assert line_distance(a, Polyline(((10, 0), (0, 0)))) == pytest.approx(0.0, abs=1e-12)  # direction-free
    assert line_distance(a, Polyline(((0, 3), (10, 3)))) == pytest.approx(3.0)


def test_hungarian_finds_the_best_assignment() -> None:
    gts = [Box(0, 0, 10, 10), Box(8, 0, 18, 10)]
    preds = [Box(7, 0, 17, 10), Box(0, 0, 11, 10)]  # greedy on the first prediction would steal gt 1's match
    pairs = match(preds, gts, box_iou)
    assert sorted((p, g) for p, g, _ in pairs) == [(0, 1), (1, 0)]


def test_scores_per_type_desc_and_json_validity() -> None:
    s = DenseScores()
    gts = [(Box(0, 0, 10, 10), "red square"), (Box(20, 20, 30, 30), "blue circle"),
           (Polygon(((40, 0), (60, 0), (50, 20))), "green triangle"), (Polyline(((0, 50), (60, 50))), "black line")]
    preds = [(Box(1, 0, 10, 10), "red square"), (Box(21, 20, 30, 31), "blue square"), (Box(50, 50, 60, 60), "extra"),
             (Polygon(((41, 0), (60, 0), (50, 19))), "green triangle"), (Polyline(((0, 51), (60, 51))), "black line")]
    s.add_image(preds, gts, 64, 64)
    s.answers, s.valid_answers = 2, 1
    s.add_image([], [(Box(0, 0, 5, 5), "x")], 64, 64)  # the unparsed answer: its ground truth is missed
    r = s.results()
    box = r["by_type"]["bbox_2d"]
    assert (box["tp"], box["predicted"], box["ground_truth"]) == (2, 3, 3)
    assert r["box_f1_50"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert r["by_type"]["poly"]["f1"] == 1.0 and r["by_type"]["line"]["f1"] == 1.0
    assert r["desc_exact_match"] == pytest.approx(3 / 4)
    assert r["json_valid_rate"] == 0.5 and r["parse_failures"] == 1
    assert DenseScores.from_vector(s.vector()).results() == r


def test_generated_answers_past_the_parsers_limits_never_raise() -> None:
    """issue 24 item 4 (sibling): a model may generate a 5000-digit number, a number too large for a float or
    nesting past the recursion limit; parsing says so ("never raises"), as for any other malformed answer."""
    huge = parse_dense_answer('[{"bbox_2d":[1,2,3,' + "9" * 5000 + '],"desc":"a"}]', 1, "image_")
    assert huge.error == "not JSON (a number with more than 4300 digits)"
    deep = parse_dense_answer("[" * 100_000, 1, "image_")
    assert deep.error is not None and deep.error.startswith("not JSON (nested deeper than")
    big = parse_dense_answer('[{"bbox_2d":[1,2,3,' + "9" * 400 + '],"desc":"a"},{"bbox_2d":[1,2,3,4],"desc":"b"}]',
                             1, "image_")
    assert big.ok and big.invalid_objects == 1 and [o.desc for o in big.images[0]] == ["b"]
    assert parse_summaries('{"image_1": ' + "[" * 100_000, 2, "image_")[1].startswith("not JSON (nested deeper")


def test_parsing() -> None:
    ok = parse_dense_answer('[{"bbox_2d":[1,2,3,4],"desc":"a"},{"poly":[1,2],"desc":"short"},'
                            '{"line":[0,0,5,5],"desc":"l"}]',
                            1, "image_")
    assert ok.ok and [o.key for o in ok.images[0]] == ["bbox_2d", "line"] and ok.invalid_objects == 1
    assert not parse_dense_answer('[{"bbox_2d":[1,2,3', 1, "image_").ok
    assert not parse_dense_answer('{"bbox_2d":[1,2,3,4]}', 1, "image_").ok
    two = parse_dense_answer('{"image_1":[],"image_2":[{"bbox_2d":[1,2,3,4],"desc":"a"}]}', 2, "image_")
    assert two.ok and [len(i) for i in two.images] == [0, 1]
    assert parse_dense_answer('{"image_1":[]}', 2, "image_").error == "image_2: missing or not a list of objects"
    assert parse_summaries('{"image_1":"a","image_2":" "}', 2, "image_") == (None, "image_2: missing or empty summary")
    assert parse_summaries("red circle", 1, "image_") == (["red circle"], None)

"""Degenerate geometry (`degenerate: clamp | drop`, counted either way) and the October `quad` through augmentation."""

from __future__ import annotations

import pytest
from dense_caption.augment import AugmentationConfig, Augmenter, Telemetry
from dense_caption.geometry import (
    Box,
    Polygon,
    Polyline,
    Quad,
    clamp_geometry,
    from_coords,
    identity,
    rotation,
    transform_geometry,
    translation,
)


def test_clamp_geometry_numbers() -> None:
    """Clamped, not clipped: vertices moved into [0, 100] x [0, 100]; None when that leaves no area (length)."""
    # a box wholly right of the image clamps onto the edge x = 100: no area, None
    assert transform_geometry(Box(10, 10, 20, 20), translation(95, 0), 100, 100).degenerate
    assert clamp_geometry(Box(10, 10, 20, 20), translation(95, 0), 100, 100) is None
    # a line 0.5 px below the image clamps onto its bottom edge, 80 px long
    line = Polyline(((10, 50), (90, 50)))
    assert transform_geometry(line, translation(0, 50.5), 100, 100).degenerate
    assert clamp_geometry(line, translation(0, 50.5), 100, 100) == Polyline(((10.0, 100.0), (90.0, 100.0)))
    # a thin quad passing outside the top-right corner (edges y = x - 101 and y = x - 103): clipping leaves
    # nothing, clamping leaves (95, 0), (100, 4), (100, 3), (96, 0): area |380 - 100 - 288| / 2 = 4
    quad = Quad(((95, -6), (105, 4), (106, 3), (96, -7)))
    assert transform_geometry(quad, identity(), 100, 100).degenerate
    out = clamp_geometry(quad, identity(), 100, 100)
    assert out == Quad(((95.0, 0.0), (100.0, 4.0), (100.0, 3.0), (96.0, 0.0))) and out.area() == 4.0
    # a box turned 90 degrees about (0, 0) (x -> -y, y -> x) lands left of the image: clamps onto x = 0, None
    assert clamp_geometry(Box(10, 10, 20, 20), rotation(90), 100, 100) is None


@pytest.mark.parametrize("mode", ["clamp", "drop"])
def test_degenerate_mode_keeps_or_drops_and_counts(mode: str) -> None:
    """Zoom x2 about the centre of 100 x 100 (x -> 2x - 50): a box at the corner leaves the image (clamps to
    nothing: dropped in both modes), a line at y = 10 goes to y = -30 (clamp: kept on the top edge, 100 px), a
    centre box stays (30..70)."""
    cfg = AugmentationConfig.model_validate({"enabled": True, "degenerate": mode, "ops": [
        {"name": "scale", "params": {"lo": 2.0, "hi": 2.0}}]})
    objs = [(Box(0, 0, 10, 10), "corner"), (Polyline(((20, 10), (80, 10))), "line"), (Box(40, 40, 60, 60), "centre")]
    out = Augmenter(cfg)(100, 100, objs, seed=0, index=0)
    tele = Telemetry()
    tele.add(out, len(objs))
    kept = {it.desc: it.geom for it in out.items}
    assert kept["centre"] == Box(30.0, 30.0, 70.0, 70.0)
    if mode == "clamp":
        assert kept["line"] == Polyline(((0.0, 0.0), (100.0, 0.0))) and set(kept) == {"line", "centre"}
        assert (tele.counts["clamped_degenerate"], tele.counts["dropped_degenerate"]) == (1, 1)
        assert tele.counts["objects_out"] == 2
    else:
        assert set(kept) == {"centre"}
        assert (tele.counts["clamped_degenerate"], tele.counts["dropped_degenerate"]) == (0, 2)
        assert tele.counts["objects_out"] == 1


def test_default_degenerate_mode_is_clamp() -> None:
    assert AugmentationConfig().degenerate == "clamp"


def test_quad_stays_a_quad_with_four_corners_else_a_poly() -> None:
    quad = from_coords("quad", [10, 10, 50, 12, 48, 40, 12, 38])
    assert isinstance(quad, Quad) and quad.key == "quad"
    with pytest.raises(ValueError, match="quad needs 8 numbers"):
        from_coords("quad", [10, 10, 50, 12, 48, 40])
    # moved, still inside: a quad, its corners moved by (5, 0)
    (moved,) = transform_geometry(quad, translation(5, 0), 100, 100).geometries
    assert moved == Quad(((15.0, 10.0), (55.0, 12.0), (53.0, 40.0), (17.0, 38.0)))
    # its corner (55, 12) cut off by the right edge of a 54-wide image: five corners, written as a poly
    (cut,) = transform_geometry(quad, translation(5, 0), 54, 100).geometries
    assert type(cut) is Polygon and cut.key == "poly" and len(cut.points) == 5


def test_quads_are_scored_as_polygons() -> None:
    """A predicted quad matches a ground-truth quad (and a poly) as polygons: one true positive under `poly`."""
    from dense_caption.metrics import DenseScores

    quad = Quad(((10, 10), (50, 12), (48, 40), (12, 38)))
    scores = DenseScores()
    scores.add_image([(quad, "plate"), (Polygon(quad.points), "plate 2")],
                     [(quad, "plate"), (Polygon(quad.points), "plate 2")], 64, 64)
    r = scores.results()["by_type"]["poly"]
    assert (r["tp"], r["predicted"], r["ground_truth"]) == (2, 2, 2)

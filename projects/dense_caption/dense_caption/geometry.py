"""Geometry of dense-caption objects: boxes, polygons and polylines under affine maps, clipped to the image.

Coordinates are continuous pixel coordinates: the image spans [0, width] x [0, height], pixel (i, j)
covers [i, i + 1] x [j, j + 1], so a box [x1, y1, x2, y2] covers the pixels x1 .. x2 - 1 (what PIL draws
and what an affine warp of the image moves). A 3x3 matrix M maps a point (x, y) to M @ (x, y, 1).

`transform_geometry(geom, M, width, height)` applies M and clips to the (new) image:

* a box stays a box when M keeps axes axis-aligned (flips, scales, multiples of 90 degrees); any other
  rotation or shear turns it into the 4-point polygon of its corners;
* polygons are clipped with Sutherland-Hodgman against the image rectangle (exact for any simple polygon:
  the window is convex); a result with no area is degenerate (see `clamp_geometry` for what the augmentation
  does with it); a quad (`quad`, the October documents' four-point quadrilateral) is a polygon: it stays a
  quad while it keeps 4 vertices and becomes a `poly` when clipping gives it more;
* polylines are clipped segment by segment (Liang-Barsky); where a line leaves the image and comes back,
  it is split into separate polylines;
* `coverage` is the visible share of the transformed geometry: clipped area / area (length for lines).

Only numpy here (no shapely: that is the test oracle, a dev dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

GEOMETRY_KEYS = ("bbox_2d", "poly", "quad", "line")
#: areas and lengths at or below these are "nothing left" (pixels^2 / pixels)
AREA_EPS = 1e-9
LENGTH_EPS = 1e-9


def _points(coords: Sequence[float]) -> tuple[tuple[float, float], ...]:
    if len(coords) % 2:
        raise ValueError(f"coordinates come in x, y pairs; got {len(coords)} numbers")
    return tuple((float(coords[i]), float(coords[i + 1])) for i in range(0, len(coords), 2))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box [x1, y1, x2, y2] (x1 <= x2, y1 <= y2)."""

    x1: float
    y1: float
    x2: float
    y2: float
    key: ClassVar[str] = "bbox_2d"

    def coords(self) -> list[float]:
        """[x1, y1, x2, y2]."""
        return [self.x1, self.y1, self.x2, self.y2]

    def corners(self) -> np.ndarray:
        """(4, 2): top-left, top-right, bottom-right, bottom-left."""
        return np.array([[self.x1, self.y1], [self.x2, self.y1], [self.x2, self.y2], [self.x1, self.y2]], float)

    def area(self) -> float:
        """Width x height."""
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


@dataclass(frozen=True)
class Polygon:
    """A simple polygon, its vertices in order (either orientation); the last connects to the first."""

    points: tuple[tuple[float, float], ...]
    key: ClassVar[str] = "poly"

    def coords(self) -> list[float]:
        """[x1, y1, x2, y2, ...]."""
        return [c for p in self.points for c in p]

    def array(self) -> np.ndarray:
        """(N, 2) vertices."""
        return np.array(self.points, float).reshape(-1, 2)

    def area(self) -> float:
        """Absolute shoelace area."""
        return polygon_area(self.array())


@dataclass(frozen=True)
class Polyline:
    """An open polyline through its points, in order."""

    points: tuple[tuple[float, float], ...]
    key: ClassVar[str] = "line"

    def coords(self) -> list[float]:
        """[x1, y1, x2, y2, ...]."""
        return [c for p in self.points for c in p]

    def array(self) -> np.ndarray:
        """(N, 2) points."""
        return np.array(self.points, float).reshape(-1, 2)

    def length(self) -> float:
        """Sum of the segment lengths."""
        return polyline_length(self.array())


@dataclass(frozen=True)
class Quad(Polygon):
    """A four-point quadrilateral [x1, y1, ..., x4, y4] (the October documents' `quad`): a polygon of 4 vertices."""

    key: ClassVar[str] = "quad"


Geometry = Box | Polygon | Polyline


def from_coords(key: str, coords: Sequence[float]) -> Geometry:
    """The geometry of a record object's `bbox_2d` / `poly` / `line` value (pixel coordinates)."""
    if key == "bbox_2d":
        if len(coords) != 4:
            raise ValueError(f"bbox_2d needs 4 numbers, got {len(coords)}")
        x1, y1, x2, y2 = (float(c) for c in coords)
        return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    if key == "poly":
        return Polygon(_points(coords))
    if key == "quad":
        if len(coords) != 8:
            raise ValueError(f"quad needs 8 numbers [x1, y1, ..., x4, y4], got {len(coords)}")
        return Quad(_points(coords))
    if key == "line":
        return Polyline(_points(coords))
    raise ValueError(f"unknown geometry key {key!r}; allowed: {', '.join(GEOMETRY_KEYS)}")


def object_geometry(obj: dict) -> Geometry:
    """The geometry of a record object (exactly one of bbox_2d / poly / line)."""
    keys = [k for k in GEOMETRY_KEYS if k in obj]
    if len(keys) != 1:
        raise ValueError(f"an object needs exactly one of {', '.join(GEOMETRY_KEYS)}, got {keys or 'none'}")
    return from_coords(keys[0], obj[keys[0]])


# ------------------------------------------------------------------------------------------ measures
def polygon_area(points: np.ndarray) -> float:
    """Absolute shoelace area of the polygon through `points` (N, 2)."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def polyline_length(points: np.ndarray) -> float:
    """Sum of segment lengths of the polyline through `points` (N, 2)."""
    if len(points) < 2:
        return 0.0
    return float(np.sqrt((np.diff(points, axis=0) ** 2).sum(axis=1)).sum())


def measure(geom: Geometry) -> float:
    """Area of a box or polygon, length of a polyline."""
    return geom.length() if isinstance(geom, Polyline) else geom.area()


# ------------------------------------------------------------------------------------------ matrices
def identity() -> np.ndarray:
    """The 3x3 identity."""
    return np.eye(3)


def translation(tx: float, ty: float) -> np.ndarray:
    """Move by (tx, ty)."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scaling(sx: float, sy: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """Scale by (sx, sy) about (cx, cy)."""
    return translation(cx, cy) @ np.diag([sx, sy, 1.0]) @ translation(-cx, -cy)


def rotation(degrees: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """Rotate by `degrees` about (cx, cy); positive turns clockwise on screen (y points down), like
    `PIL.Image.rotate` with a negative angle."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return translation(cx, cy) @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ translation(-cx, -cy)


def hflip(width: float) -> np.ndarray:
    """Mirror left-right in an image `width` wide: x -> width - x."""
    return np.array([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def vflip(height: float) -> np.ndarray:
    """Mirror top-bottom in an image `height` high: y -> height - y."""
    return np.array([[1.0, 0.0, 0.0], [0.0, -1.0, float(height)], [0.0, 0.0, 1.0]])


def apply_affine(points: np.ndarray, M: np.ndarray) -> np.ndarray:
    """`points` (N, 2) mapped by the affine 3x3 `M`."""
    pts = np.asarray(points, float).reshape(-1, 2)
    return pts @ M[:2, :2].T + M[:2, 2]


def keeps_axes(M: np.ndarray, tol: float = 1e-12) -> bool:
    """Whether `M` maps axis-aligned boxes to axis-aligned boxes (no rotation off multiples of 90 degrees, no shear)."""
    a = M[:2, :2]
    return (abs(a[0, 1]) <= tol and abs(a[1, 0]) <= tol) or (abs(a[0, 0]) <= tol and abs(a[1, 1]) <= tol)


# ------------------------------------------------------------------------------------------ clipping
def clip_polygon(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland-Hodgman: the polygon `points` (N, 2) clipped to [0, width] x [0, height].

    Exact for a simple polygon (the clip window is convex); a concave one may come back with zero-area
    bridges along the border, which change neither its area nor its rasterisation. Consecutive duplicate
    vertices are removed. Vertex order is kept: a polygon inside the window comes back unchanged.
    """
    out = [tuple(p) for p in np.asarray(points, float).reshape(-1, 2)]
    # (axis, bound, keep points with coordinate >= bound if sign > 0 else <= bound)
    for axis, bound, sign in ((0, 0.0, 1), (0, float(width), -1), (1, 0.0, 1), (1, float(height), -1)):
        if not out:
            break
        src, out = out, []

        def inside(p: tuple[float, float], axis: int = axis, bound: float = bound, sign: int = sign) -> bool:
            return (p[axis] - bound) * sign >= 0.0

        for i, cur in enumerate(src):
            prev = src[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(_cross(prev, cur, axis, bound))
                out.append(cur)
            elif inside(prev):
                out.append(_cross(prev, cur, axis, bound))
    pts = np.array(out, float).reshape(-1, 2)
    # Snap to the window (intersections can land 1 ulp outside) and drop repeated vertices.
    pts[:, 0] = np.clip(pts[:, 0], 0.0, width)
    pts[:, 1] = np.clip(pts[:, 1], 0.0, height)
    return _dedupe(pts, closed=True)


def _cross(p: tuple[float, float], q: tuple[float, float], axis: int, bound: float) -> tuple[float, float]:
    """Where segment p-q crosses the line `coordinate[axis] == bound`."""
    t = (bound - p[axis]) / (q[axis] - p[axis])
    x, y = p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])
    return (bound, y) if axis == 0 else (x, bound)


def _same_point(a: np.ndarray, b: np.ndarray) -> bool:
    # Within LENGTH_EPS, not bit-equal: a transform's rounding can merge two vertices 1e-279 apart (W - x == W)
    # and leave them apart untransformed, so exact equality would make identity and a double flip disagree.
    return bool(np.abs(a - b).max() <= LENGTH_EPS)


def _dedupe(pts: np.ndarray, *, closed: bool) -> np.ndarray:
    """`pts` without vertices at (within LENGTH_EPS of) the previous kept one (closed: nor the first)."""
    if len(pts) == 0:
        return pts
    keep = [0]
    for i in range(1, len(pts)):
        if not _same_point(pts[i], pts[keep[-1]]):
            keep.append(i)
    if closed and len(keep) > 1 and _same_point(pts[keep[-1]], pts[keep[0]]):
        keep.pop()
    return pts[keep]


def clip_segment(p: np.ndarray, q: np.ndarray, width: float, height: float) -> tuple[float, float] | None:
    """Liang-Barsky: the parameter range [t0, t1] of segment p + t (q - p) inside the window, or None."""
    px, py, dx, dy = float(p[0]), float(p[1]), float(q[0] - p[0]), float(q[1] - p[1])
    t0, t1 = 0.0, 1.0
    for num, den in ((px, -dx), (width - px, dx), (py, -dy), (height - py, dy)):
        # the constraint is den * t <= num
        if den == 0.0:
            if num < 0.0:
                return None
            continue
        t = num / den
        if den < 0.0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return None
    return t0, t1


def clip_polyline(points: np.ndarray, width: float, height: float) -> list[np.ndarray]:
    """The polyline `points` (N, 2) clipped to the window: one array per visible run (split where it
    leaves the image and comes back); runs without length are dropped."""
    pts = np.asarray(points, float).reshape(-1, 2)
    pieces: list[list[np.ndarray]] = []
    open_piece = False  # the last piece ends at the previous segment's end point, inside the window
    for i in range(len(pts) - 1):
        p, q = pts[i], pts[i + 1]
        span = clip_segment(p, q, width, height)
        if span is None:
            open_piece = False
            continue
        t0, t1 = span
        # an end inside the window is kept bit for bit (p + 1.0 * (q - p) can differ from q by an ulp), so
        # clipping is idempotent: a clipped polyline clipped again comes back unchanged
        a = p.copy() if t0 == 0.0 else p + t0 * (q - p)
        b = q.copy() if t1 == 1.0 else p + t1 * (q - p)
        if open_piece and t0 == 0.0:
            pieces[-1].append(b)
        else:
            pieces.append([a, b])
        open_piece = t1 == 1.0
    out = []
    for piece in pieces:
        arr = np.array(piece, float)
        arr[:, 0] = np.clip(arr[:, 0], 0.0, width)
        arr[:, 1] = np.clip(arr[:, 1], 0.0, height)
        arr = _dedupe(arr, closed=False)
        if polyline_length(arr) > LENGTH_EPS:
            out.append(arr)
    return out


# --------------------------------------------------------------------------------------- the transform
@dataclass
class Clipped:
    """What is left of one geometry after a transform: 0, 1 or (a split polyline) several geometries."""

    geometries: list[Geometry] = field(default_factory=list)
    #: visible share of the transformed geometry: clipped area / area (lengths for polylines), in [0, 1]
    coverage: float = 0.0

    @property
    def degenerate(self) -> bool:
        """Nothing with area (length for lines) is left: the object is dropped."""
        return not self.geometries


def transform_geometry(geom: Geometry, M: np.ndarray, width: float, height: float) -> Clipped:
    """`geom` mapped by the 3x3 affine `M` and clipped to the image [0, width] x [0, height] it lands in."""
    M = np.asarray(M, float)
    if isinstance(geom, Box):
        corners = apply_affine(geom.corners(), M)
        if keeps_axes(M):
            (x1, y1), (x2, y2) = corners.min(axis=0), corners.max(axis=0)
            full = (x2 - x1) * (y2 - y1)
            cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
            cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
            seen = max(0.0, cx2 - cx1) * max(0.0, cy2 - cy1)
            if full <= AREA_EPS or seen <= AREA_EPS:
                return Clipped([], 0.0)
            return Clipped([Box(float(cx1), float(cy1), float(cx2), float(cy2))], min(1.0, seen / full))
        return _polygon_result(corners, width, height)
    if isinstance(geom, Polygon):
        out = _polygon_result(apply_affine(geom.array(), M), width, height)
        if isinstance(geom, Quad) and out.geometries and len(out.geometries[0].points) == 4:
            out.geometries = [Quad(out.geometries[0].points)]  # still four corners: still a quad
        return out
    if isinstance(geom, Polyline):
        moved = apply_affine(geom.array(), M)
        full = polyline_length(moved)
        pieces = clip_polyline(moved, width, height)
        seen = sum(polyline_length(p) for p in pieces)
        if full <= LENGTH_EPS or not pieces:
            return Clipped([], 0.0)
        return Clipped([Polyline(tuple(map(tuple, p.tolist()))) for p in pieces], min(1.0, seen / full))
    raise TypeError(f"not a geometry: {type(geom).__name__}")


def _polygon_result(points: np.ndarray, width: float, height: float) -> Clipped:
    full = polygon_area(points)
    clipped = clip_polygon(points, width, height)
    seen = polygon_area(clipped)
    if full <= AREA_EPS or len(clipped) < 3 or seen <= AREA_EPS:
        return Clipped([], 0.0)
    return Clipped([Polygon(tuple(map(tuple, clipped.tolist())))], min(1.0, seen / full))


def bounds(geom: Geometry) -> tuple[float, float, float, float]:
    """(min x, min y, max x, max y) of a geometry."""
    if isinstance(geom, Box):
        return geom.x1, geom.y1, geom.x2, geom.y2
    arr = geom.array()
    return float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 0].max()), float(arr[:, 1].max())


def clamp_geometry(geom: Geometry, M: np.ndarray, width: float, height: float) -> Geometry | None:
    """The fallback for a geometry `transform_geometry` left nothing of (`degenerate: clamp`): `geom` mapped by
    `M` with every vertex clamped into [0, width] x [0, height] (not clipped).

    A box that keeps its axes stays a box of its clamped corners; any other box becomes the polygon of its
    clamped corners; a polygon (quad) keeps its clamped vertices (consecutive repeats removed; a quad that keeps
    4 distinct vertices stays a quad); a polyline keeps its clamped points (repeats removed). None when the
    clamped result itself has no area (length for a polyline), at or below AREA_EPS (LENGTH_EPS): e.g. an object
    wholly beyond one edge clamps onto that edge, a zero-area sliver, and is dropped even under clamp.
    """
    M = np.asarray(M, float)

    def clamp(points: np.ndarray) -> np.ndarray:
        out = np.asarray(points, float).copy()
        out[:, 0] = np.clip(out[:, 0], 0.0, width)
        out[:, 1] = np.clip(out[:, 1], 0.0, height)
        return out

    if isinstance(geom, Box) and keeps_axes(M):
        corners = clamp(apply_affine(geom.corners(), M))
        (x1, y1), (x2, y2) = corners.min(axis=0), corners.max(axis=0)
        box = Box(float(x1), float(y1), float(x2), float(y2))
        return box if box.area() > AREA_EPS else None
    if isinstance(geom, Box | Polygon):
        src = geom.corners() if isinstance(geom, Box) else geom.array()
        pts = _dedupe(clamp(apply_affine(src, M)), closed=True)
        if len(pts) < 3 or polygon_area(pts) <= AREA_EPS:
            return None
        cls = Quad if isinstance(geom, Quad) and len(pts) == 4 else Polygon
        return cls(tuple(map(tuple, pts.tolist())))
    if isinstance(geom, Polyline):
        pts = _dedupe(clamp(apply_affine(geom.array(), M)), closed=False)
        if len(pts) < 2 or polyline_length(pts) <= LENGTH_EPS:
            return None
        return Polyline(tuple(map(tuple, pts.tolist())))
    raise TypeError(f"not a geometry: {type(geom).__name__}")

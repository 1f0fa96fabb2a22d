"""Dense-caption metrics: predicted objects matched to ground truth per image, P / R / F1 per geometry type.

Per image and per geometry type (boxes with boxes, polygons with polygons, lines with lines), predictions are
matched to ground-truth objects one-to-one by the Hungarian algorithm (scipy) maximising the similarity; a
matched pair counts as a true positive when its similarity reaches the threshold:

* boxes: IoU >= 0.5;
* polygons (quads among them): polygon IoU >= 0.5 (exact intersection by Sutherland-Hodgman clipping when
  either polygon is convex, else rasterised on a 256 x 256 grid over the pair's bounding box);
* lines: similarity 1 - d / tol >= 0.5, i.e. a symmetric mean distance d <= tol / 2, where d averages, over
  32 points spread evenly along each line, the distance to the other line, and tol = `line_tolerance`
  (default 0.1) x the image diagonal; so by default a line matches within 5% of the diagonal.

Precision = TP / predictions, recall = TP / ground truth, F1 their harmonic mean (0 when both are 0). The
description exact match is over true positives (arctic_vl's `normalize_answer` on both sides). An answer
that does not parse predicts nothing (its ground truth counts as missed) and is counted, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import Box, Geometry, Polygon, Polyline, polygon_area, polyline_length

IOU_THRESHOLD = 0.5
TYPES = ("bbox_2d", "poly", "line")


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    iw = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    ih = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = iw * ih
    union = a.area() + b.area() - inter
    return inter / union if union > 0 else 0.0


def _is_convex(pts: np.ndarray) -> bool:
    if len(pts) < 3:
        return False
    d = np.roll(pts, -1, axis=0) - pts
    cross = d[:, 0] * np.roll(d[:, 1], -1) - d[:, 1] * np.roll(d[:, 0], -1)
    nz = cross[np.abs(cross) > 1e-12]
    return len(nz) > 0 and (bool((nz > 0).all()) or bool((nz < 0).all()))


def _clip_convex(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: `subject` clipped by the convex polygon `clip` (either orientation)."""
    d = np.roll(clip, -1, axis=0) - clip
    area2 = float(np.sum(clip[:, 0] * np.roll(clip[:, 1], -1) - np.roll(clip[:, 0], -1) * clip[:, 1]))
    sign = 1.0 if area2 > 0 else -1.0
    out = [tuple(p) for p in subject]
    for a, e in zip(clip, d):
        if not out:
            break
        src, out = out, []

        def side(p: tuple[float, float], a: np.ndarray = a, e: np.ndarray = e) -> float:
            return sign * (e[0] * (p[1] - a[1]) - e[1] * (p[0] - a[0]))

        for i, cur in enumerate(src):
            prev = src[i - 1]
            sc, sp = side(cur), side(prev)
            if sc >= 0:
                if sp < 0:
                    t = sp / (sp - sc)
                    out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
                out.append(cur)
            elif sp >= 0:
                t = sp / (sp - sc)
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
    return np.array(out, float).reshape(-1, 2)


def _raster_iou(a: np.ndarray, b: np.ndarray, resolution: int = 256) -> float:
    from PIL import Image, ImageDraw

    both = np.vstack([a, b])
    lo, hi = both.min(axis=0), both.max(axis=0)
    scale = (resolution - 1) / max(float((hi - lo).max()), 1e-9)
    masks = []
    for pts in (a, b):
        im = Image.new("1", (resolution, resolution), 0)
        ImageDraw.Draw(im).polygon([tuple(p) for p in ((pts - lo) * scale).tolist()], fill=1)
        masks.append(np.asarray(im, bool))
    union = (masks[0] | masks[1]).sum()
    return float((masks[0] & masks[1]).sum() / union) if union else 0.0


def polygon_iou(a: Polygon | Box, b: Polygon | Box) -> float:
    """IoU of two polygons: exact when either is convex, rasterised otherwise (see the module docstring)."""
    pa = a.corners() if isinstance(a, Box) else a.array()
    pb = b.corners() if isinstance(b, Box) else b.array()
    area_a, area_b = polygon_area(pa), polygon_area(pb)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    if _is_convex(pb):
        inter = polygon_area(_clip_convex(pa, pb))
    elif _is_convex(pa):
        inter = polygon_area(_clip_convex(pb, pa))
    else:
        return _raster_iou(pa, pb)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _resample(pts: np.ndarray, n: int = 32) -> np.ndarray:
    seg = np.sqrt((np.diff(pts, axis=0) ** 2).sum(axis=1))
    total = float(seg.sum())
    if total <= 0:
        return np.repeat(pts[:1], n, axis=0)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    at = np.linspace(0.0, total, n)
    return np.stack([np.interp(at, cum, pts[:, 0]), np.interp(at, cum, pts[:, 1])], axis=1)


def _point_to_polyline(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    p, q = line[:-1], line[1:]
    d = q - p
    dd = np.maximum((d ** 2).sum(axis=1), 1e-18)
    rel = points[:, None, :] - p[None]
    t = np.clip((rel * d[None]).sum(axis=2) / dd[None], 0.0, 1.0)
    nearest = p[None] + t[..., None] * d[None]
    return np.sqrt(((points[:, None, :] - nearest) ** 2).sum(axis=2)).min(axis=1)


def line_distance(a: Polyline, b: Polyline) -> float:
    """Symmetric mean distance between two polylines (32 evenly spaced points along each)."""
    pa, pb = a.array(), b.array()
    if len(pa) < 2 or len(pb) < 2 or polyline_length(pa) <= 0 or polyline_length(pb) <= 0:
        return math.inf
    return float((_point_to_polyline(_resample(pa), pb).mean() + _point_to_polyline(_resample(pb), pa).mean()) / 2)


def metric_kind(geom: Geometry) -> str:
    """The type an object is scored as: its key, except that a quad is scored as a polygon (`poly`)."""
    return "poly" if isinstance(geom, Polygon) else geom.key


def similarity_fn(kind: str, width: float, height: float, line_tolerance: float) -> Callable[[Any, Any], float]:
    """The similarity used to match objects of one geometry type (IoU; the line score of the docstring)."""
    if kind == "bbox_2d":
        return box_iou
    if kind == "poly":
        return polygon_iou
    tol = line_tolerance * math.hypot(width, height)
    return lambda a, b: max(0.0, 1.0 - line_distance(a, b) / tol)


def match(preds: list[Geometry], gts: list[Geometry], sim: Callable[[Any, Any], float],
          threshold: float = IOU_THRESHOLD) -> list[tuple[int, int, float]]:
    """Hungarian matching maximising similarity; the (pred, gt, similarity) pairs at or above `threshold`."""
    if not preds or not gts:
        return []
    from scipy.optimize import linear_sum_assignment

    scores = np.array([[sim(p, g) for g in gts] for p in preds], float)
    rows, cols = linear_sum_assignment(-scores)
    return [(int(r), int(c), float(scores[r, c])) for r, c in zip(rows, cols) if scores[r, c] >= threshold]


@dataclass
class DenseScores:
    """Counts over many images, summable over processes (`vector` / `from_vector`)."""

    tp: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TYPES, 0.0))
    predicted: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TYPES, 0.0))
    truth: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TYPES, 0.0))
    desc_correct: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TYPES, 0.0))
    answers: float = 0.0
    valid_answers: float = 0.0
    invalid_objects: float = 0.0

    def add_image(self, preds: list[tuple[Geometry, str]], gts: list[tuple[Geometry, str]], width: float,
                  height: float, line_tolerance: float = 0.1) -> None:
        """Score one image's predicted (geometry, desc) list against its ground truth."""
        from arctic_vl import normalize_answer

        for kind in TYPES:
            p = [(g, d) for g, d in preds if metric_kind(g) == kind]
            t = [(g, d) for g, d in gts if metric_kind(g) == kind]
            self.predicted[kind] += len(p)
            self.truth[kind] += len(t)
            pairs = match([g for g, _ in p], [g for g, _ in t], similarity_fn(kind, width, height, line_tolerance))
            self.tp[kind] += len(pairs)
            self.desc_correct[kind] += sum(normalize_answer(p[i][1]) == normalize_answer(t[j][1]) for i, j, _ in pairs)

    def vector(self) -> list[float]:
        """All counts as one list (for `all_reduce_sum`)."""
        out = []
        for d in (self.tp, self.predicted, self.truth, self.desc_correct):
            out += [d[k] for k in TYPES]
        return [*out, self.answers, self.valid_answers, self.invalid_objects]

    @classmethod
    def from_vector(cls, v: list[float]) -> DenseScores:
        """The inverse of `vector`."""
        n = len(TYPES)
        dicts = [dict(zip(TYPES, v[i * n:(i + 1) * n])) for i in range(4)]
        return cls(*dicts, answers=v[4 * n], valid_answers=v[4 * n + 1], invalid_objects=v[4 * n + 2])

    def results(self) -> dict[str, Any]:
        """P / R / F1 per type and overall, description exact match, json_valid_rate, box_f1_50."""
        def prf(tp: float, pred: float, truth: float) -> dict[str, float]:
            p = tp / pred if pred else 0.0
            r = tp / truth if truth else 0.0
            return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                    "tp": int(tp), "predicted": int(pred), "ground_truth": int(truth)}

        by_type = {k: prf(self.tp[k], self.predicted[k], self.truth[k]) for k in TYPES}
        tp = sum(self.tp.values())
        overall = prf(tp, sum(self.predicted.values()), sum(self.truth.values()))
        return {
            "box_f1_50": by_type["bbox_2d"]["f1"],
            "json_valid_rate": self.valid_answers / self.answers if self.answers else 0.0,
            "f1_50": overall["f1"],
            "desc_exact_match": sum(self.desc_correct.values()) / tp if tp else 0.0,
            "answers": int(self.answers),
            "parse_failures": int(self.answers - self.valid_answers),
            "invalid_objects": int(self.invalid_objects),
            "by_type": by_type,
        }

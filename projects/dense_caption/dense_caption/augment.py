"""Geometry-aware augmentation from YAML: the image and every object change together, always.

    data:
      augmentation:
        enabled: true
        bypass_prob: 0.1              # this share of samples is left as is
        degenerate: clamp             # an object a warp leaves nothing of: clamp (default) or drop; counted
        fill: [245, 245, 245]         # colour of the area a warp uncovers
        ops:
          - {name: hflip, params: {prob: 0.5}}
          - {name: rotate, params: {max_deg: 10, prob: 0.3}}
          - {name: expand_to_fit_affine}
          - {name: random_crop, params: {size: [0.7, 1.0], min_coverage: 0.4, prob: 0.3}}
          - {name: brightness, params: {range: [0.8, 1.2], prob: 0.5}}

Order of work: affine ops (hflip, vflip, rotate, scale) only multiply into one pending 3x3 matrix; a
barrier (pad_to_multiple, expand_to_fit_affine, resize_by_scale, random_crop) or the end of the list
flushes it: the image is warped ONCE by (barrier's own map) x (pending matrix) and every geometry is mapped
by the same matrix and clipped to the new canvas (`geometry.transform_geometry`). Colour ops (brightness,
contrast, saturation, gamma, color_jitter, clahe) run after every geometric op, whatever their place in the list.

Randomness: each op draws from its own generator seeded by (epoch_seed(seed, epoch), record index, op
position), so a sample's augmentation is a function of those alone: DataLoader workers, ranks and a resumed
run see the same one, and the geometry can be recomputed without pixels (`image=None`).

A bad op name or parameter is a config error naming the file, line, field and the allowed values.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import geometry as G

# ---------------------------------------------------------------------------------------- op parameters


class OpParams(BaseModel):
    """Parameters every op takes: `prob`, the chance it is applied to a sample."""

    model_config = ConfigDict(extra="forbid")

    prob: float = Field(1.0, ge=0, le=1, description="chance the op is applied to a sample")


def _check_range(lo: float, hi: float, what: str) -> None:
    if lo > hi:
        raise ValueError(f"{what}: the low end {lo} is above the high end {hi}")


class FlipParams(OpParams):
    """Parameters of `hflip` and `vflip`: only `prob`, here 0.5 by default."""

    prob: float = Field(0.5, ge=0, le=1)


class RotateParams(OpParams):
    """Parameters of `rotate`: `prob` and the largest angle `max_deg` (degrees, either way)."""

    max_deg: float = Field(10.0, gt=0, le=180, description="angle drawn uniformly in [-max_deg, max_deg] degrees")


class ScaleParams(OpParams):
    """Parameters of `scale`: `prob` and the zoom range `lo` <= `hi` (about the centre, canvas unchanged)."""

    lo: float = Field(0.9, gt=0, description="smallest zoom factor (about the image centre; canvas unchanged)")
    hi: float = Field(1.1, gt=0, description="largest zoom factor")

    @model_validator(mode="after")
    def _order(self) -> ScaleParams:
        _check_range(self.lo, self.hi, "lo/hi")
        return self


class PadParams(BaseModel):
    """Parameters of `pad_to_multiple`: the `multiple` both sides are padded up to (always applied, no `prob`)."""

    model_config = ConfigDict(extra="forbid")

    multiple: int = Field(32, ge=1, description="pad right and bottom up to a multiple of this many pixels")


class ExpandParams(BaseModel):
    """Parameters of `expand_to_fit_affine`: the `multiple` the grown canvas is rounded up to (always applied)."""

    model_config = ConfigDict(extra="forbid")

    multiple: int = Field(1, ge=1, description="round the expanded canvas up to a multiple of this")


class ResizeParams(OpParams):
    """Parameters of `resize_by_scale`: `prob`, the factor range `lo` <= `hi`, the `multiple` of the new size."""

    lo: float = Field(0.8, gt=0, description="smallest factor the canvas (image and geometry) is resized by")
    hi: float = Field(1.2, gt=0, description="largest factor")
    multiple: int = Field(1, ge=1, description="round the new size to a multiple of this")

    @model_validator(mode="after")
    def _order(self) -> ResizeParams:
        _check_range(self.lo, self.hi, "lo/hi")
        return self


class CropParams(OpParams):
    """Parameters of `random_crop`: `prob`, the crop `size` range (shares in (0, 1]) and `min_coverage`."""

    size: tuple[float, float] = Field((0.6, 1.0), description="crop side as a share of the image side: [low, high]")
    min_coverage: float = Field(0.3, ge=0, le=1, description="objects with less of their area (length) inside "
                                "the crop are dropped")

    @model_validator(mode="after")
    def _order(self) -> CropParams:
        lo, hi = self.size
        if not 0 < lo <= 1 or not 0 < hi <= 1:
            raise ValueError(f"size: both ends must be in (0, 1], got {list(self.size)}")
        _check_range(lo, hi, "size")
        return self


class FactorParams(OpParams):
    """Parameters of the colour ops (brightness, contrast, saturation, gamma): `prob` and a factor `range` > 0."""

    range: tuple[float, float] = Field((0.8, 1.2), description="factor drawn uniformly in [low, high] (1 = unchanged)")

    @model_validator(mode="after")
    def _order(self) -> FactorParams:
        if self.range[0] <= 0:
            raise ValueError(f"range: factors must be > 0, got {list(self.range)}")
        _check_range(*self.range, "range")
        return self


class ColorJitterParams(OpParams):
    """Parameters of `color_jitter`: `prob` and any of the ranges `brightness`, `contrast`, `saturation` (factors
    > 0, 1 = unchanged) and `hue` (a shift in [-0.5, 0.5] of the hue circle); at least one range."""

    brightness: tuple[float, float] | None = Field(None, description="brightness factor range [low, high] (> 0)")
    contrast: tuple[float, float] | None = Field(None, description="contrast factor range [low, high] (> 0)")
    saturation: tuple[float, float] | None = Field(None, description="saturation factor range [low, high] (> 0)")
    hue: tuple[float, float] | None = Field(None, description="hue shift range [low, high] within [-0.5, 0.5] "
                                            "(a share of the hue circle)")

    @model_validator(mode="after")
    def _ranges(self) -> ColorJitterParams:
        given = {k: getattr(self, k) for k in JITTER_ORDER if getattr(self, k) is not None}
        if not given:
            raise ValueError(f"give at least one of {', '.join(JITTER_ORDER)} (a [low, high] range)")
        for k, (lo, hi) in given.items():
            if k == "hue":
                if not -0.5 <= lo <= 0.5 or not -0.5 <= hi <= 0.5:
                    raise ValueError(f"hue: both ends must be in [-0.5, 0.5], got {[lo, hi]}")
            elif lo <= 0:
                raise ValueError(f"{k}: factors must be > 0, got {[lo, hi]}")
            _check_range(lo, hi, k)
        return self


#: the order `color_jitter` applies (and draws) its parts in, fixed so a sample's draw is reproducible
JITTER_ORDER = ("brightness", "contrast", "saturation", "hue")


class ClaheParams(OpParams):
    """Parameters of `clahe`: `prob`, `clip_limit` (normalised as scikit-image's: a share of a tile's pixels, in
    (0, 1]; 1 = no limit) and `tile_grid` [across, down] (tiles of W // across x H // down pixels)."""

    clip_limit: float = Field(0.01, gt=0, le=1, description="the most pixels one histogram bin of a tile may hold, "
                              "as a share of the tile's pixels (scikit-image's normalisation; 1 = no limit)")
    tile_grid: tuple[int, int] = Field((8, 8), description="[tiles across, tiles down] (each >= 1)")

    @model_validator(mode="after")
    def _grid(self) -> ClaheParams:
        if min(self.tile_grid) < 1:
            raise ValueError(f"tile_grid: both counts must be >= 1, got {list(self.tile_grid)}")
        return self


# -------------------------------------------------------------------------------------------- the state
@dataclass
class Item:
    """One object during augmentation: its geometry (pixels of the current canvas), desc, record position."""

    geom: G.Geometry
    desc: str
    index: int


@dataclass
class State:
    """The sample as it is being augmented: canvas size, optional image, objects, pending affine matrix."""

    width: int
    height: int
    items: list[Item]
    image: Any = None  # PIL image, or None when only the geometry is wanted
    fill: tuple[int, int, int] = (0, 0, 0)
    pending: np.ndarray = field(default_factory=G.identity)
    applied: Counter = field(default_factory=Counter)
    degenerate: str = "clamp"
    dropped_degenerate: int = 0
    clamped_degenerate: int = 0
    dropped_by_crop: int = 0
    crop_coverages: list[float] = field(default_factory=list)

    def warp(self, B: np.ndarray, size: tuple[int, int], *, by_crop: bool = False) -> list[float]:
        """Map image and geometry by B @ pending into a canvas of `size`; pending becomes the identity.

        An object left with nothing visible (area, length) is degenerate: under `degenerate: clamp` it is kept
        as `geometry.clamp_geometry` (vertices clamped into the canvas; coverage 0; counted as clamped) unless
        that has no area either; otherwise it is dropped (counted as degenerate). In a crop (`by_crop`) it is
        outside the window: dropped by the crop with coverage 0, whatever the mode. Returns the coverage
        (visible share after this map) of each kept item.
        """
        M = np.asarray(B, float) @ self.pending
        w, h = int(size[0]), int(size[1])
        if self.image is not None and not (np.array_equal(M, np.eye(3)) and (w, h) == self.image.size):
            self.image = warp_image(self.image, M, (w, h), self.fill)
        kept, coverages = [], []
        for item in self.items:
            out = G.transform_geometry(item.geom, M, w, h)
            if out.degenerate:
                if by_crop:
                    self.dropped_by_crop += 1
                    self.crop_coverages.append(0.0)
                    continue
                clamped = G.clamp_geometry(item.geom, M, w, h) if self.degenerate == "clamp" else None
                if clamped is None:
                    self.dropped_degenerate += 1
                    continue
                self.clamped_degenerate += 1
                kept.append(Item(clamped, item.desc, item.index))
                coverages.append(0.0)
                continue
            for g in out.geometries:  # a polyline may come back in several runs
                kept.append(Item(g, item.desc, item.index))
                coverages.append(out.coverage)
        self.items = kept
        self.width, self.height = w, h
        self.pending = G.identity()
        return coverages


def warp_image(image: Any, M: np.ndarray, size: tuple[int, int], fill: tuple[int, int, int]) -> Any:
    """The image under the 3x3 affine `M` (image coordinates, pixel edges at integers) on a canvas of `size`."""
    from PIL import Image

    inv = np.linalg.inv(M)
    # PIL samples the output at pixel centres and maps them back through (a, b, c, d, e, f).
    return image.transform(size, Image.Transform.AFFINE, data=tuple(inv[:2].reshape(-1).tolist()),
                           resample=Image.Resampling.BILINEAR, fillcolor=tuple(fill))


# ------------------------------------------------------------------------------------------------ ops
class Op:
    """An augmentation op: `kind` is affine (a matrix), barrier (flushes and maps) or colour (pixels only)."""

    kind: ClassVar[str]
    name: ClassVar[str]

    def __init__(self, params: BaseModel):
        self.params = params

    def draw(self, rng: np.random.Generator) -> bool:
        """Whether the op applies to this sample (its `prob`)."""
        prob = getattr(self.params, "prob", 1.0)
        return prob >= 1.0 or (prob > 0.0 and rng.random() < prob)


class AffineOp(Op):
    """An op that is only a matrix: it multiplies into the pending affine and touches no pixels itself."""

    kind = "affine"

    def matrix(self, state: State, rng: np.random.Generator) -> np.ndarray:
        """The 3x3 affine of this op on the current canvas (image coordinates), drawn from `rng`."""
        raise NotImplementedError


class BarrierOp(Op):
    """An op that flushes the pending affine: it warps image and geometry once, into a new canvas."""

    kind = "barrier"

    def apply(self, state: State, rng: np.random.Generator) -> None:
        """Warp `state` in place by this op's map times the pending matrix (through `State.warp`)."""
        raise NotImplementedError


class ColourOp(Op):
    """An op on pixels only (geometry unchanged); runs after every geometric op."""

    kind = "colour"

    def colour(self, image: Any, rng: np.random.Generator) -> Any:
        """A new PIL image: `image` with this op's colour change, its factor drawn from `rng`."""
        raise NotImplementedError


class HFlip(AffineOp):
    """Mirror left-right."""

    name = "hflip"

    def matrix(self, state: State, rng: np.random.Generator) -> np.ndarray:
        """x -> width - x."""
        return G.hflip(state.width)


class VFlip(AffineOp):
    """Mirror top-bottom."""

    name = "vflip"

    def matrix(self, state: State, rng: np.random.Generator) -> np.ndarray:
        """y -> height - y."""
        return G.vflip(state.height)


class Rotate(AffineOp):
    """Rotate about the centre by an angle in [-max_deg, max_deg]; boxes become polygons (unless a multiple of 90)."""

    name = "rotate"

    def matrix(self, state: State, rng: np.random.Generator) -> np.ndarray:
        """Rotation about the canvas centre by an angle drawn uniformly in [-max_deg, max_deg]."""
        deg = float(rng.uniform(-self.params.max_deg, self.params.max_deg))
        return G.rotation(deg, state.width / 2, state.height / 2)


class Scale(AffineOp):
    """Zoom about the centre by a factor in [lo, hi] (the canvas keeps its size)."""

    name = "scale"

    def matrix(self, state: State, rng: np.random.Generator) -> np.ndarray:
        """Uniform zoom about the canvas centre by a factor drawn in [lo, hi]."""
        s = float(rng.uniform(self.params.lo, self.params.hi))
        return G.scaling(s, s, state.width / 2, state.height / 2)


def _round_up(n: float, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple - 1e-9) * multiple)


class PadToMultiple(BarrierOp):
    """Pad right and bottom so both sides are multiples of `multiple` (stable image grids and token counts)."""

    name = "pad_to_multiple"

    def apply(self, state: State, rng: np.random.Generator) -> None:
        """Flush into a canvas padded right and bottom (draws nothing from `rng`)."""
        m = self.params.multiple
        state.warp(G.identity(), (_round_up(state.width, m), _round_up(state.height, m)))


class ExpandToFitAffine(BarrierOp):
    """Flush the pending affine into a canvas grown to hold the whole transformed image (nothing cut off)."""

    name = "expand_to_fit_affine"

    def apply(self, state: State, rng: np.random.Generator) -> None:
        """Flush, shifted so the transformed image starts at (0, 0), into a canvas that holds all of it."""
        w, h = state.width, state.height
        corners = G.apply_affine(np.array([[0, 0], [w, 0], [w, h], [0, h]], float), state.pending)
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        m = self.params.multiple
        # round the extent to whole pixels first, so a 90-degree turn of 64 x 48 is exactly 48 x 64
        size = (_round_up(round(hi[0] - lo[0], 6), m), _round_up(round(hi[1] - lo[1], 6), m))
        state.warp(G.translation(-lo[0], -lo[1]), size)


class ResizeByScale(BarrierOp):
    """Resize the canvas (image and geometry) by a factor in [lo, hi]."""

    name = "resize_by_scale"

    def apply(self, state: State, rng: np.random.Generator) -> None:
        """Flush into a canvas resized by a drawn factor, each side rounded to a multiple of `multiple`."""
        s = float(rng.uniform(self.params.lo, self.params.hi))
        m = self.params.multiple
        w = max(m, round(state.width * s / m) * m)
        h = max(m, round(state.height * s / m) * m)
        state.warp(G.scaling(w / state.width, h / state.height), (w, h))


class RandomCrop(BarrierOp):
    """Crop a window of `size` x the image sides; objects with coverage below `min_coverage` are dropped."""

    name = "random_crop"

    def apply(self, state: State, rng: np.random.Generator) -> None:
        """Flush into a window at a drawn size and place; objects under `min_coverage` are dropped and counted."""
        s = float(rng.uniform(*self.params.size))
        cw, ch = max(1, round(state.width * s)), max(1, round(state.height * s))
        x0 = int(rng.integers(0, state.width - cw + 1))
        y0 = int(rng.integers(0, state.height - ch + 1))
        coverages = state.warp(G.translation(-x0, -y0), (cw, ch), by_crop=True)
        kept, seen = [], set()
        for item, cov in zip(state.items, coverages):  # a split polyline's runs share one coverage
            if item.index not in seen:
                seen.add(item.index)
                state.crop_coverages.append(cov)
                state.dropped_by_crop += int(cov < self.params.min_coverage)
            if cov >= self.params.min_coverage:
                kept.append(item)
        state.items = kept


class _Enhance(ColourOp):
    enhancer: ClassVar[str]

    def colour(self, image: Any, rng: np.random.Generator) -> Any:
        from PIL import ImageEnhance

        factor = float(rng.uniform(*self.params.range))
        return getattr(ImageEnhance, self.enhancer)(image).enhance(factor)


class Brightness(_Enhance):
    """Multiply brightness by a factor in `range`."""

    name = "brightness"
    enhancer = "Brightness"


class Contrast(_Enhance):
    """Scale contrast by a factor in `range`."""

    name = "contrast"
    enhancer = "Contrast"


class Saturation(_Enhance):
    """Scale colour saturation by a factor in `range`."""

    name = "saturation"
    enhancer = "Color"


class Gamma(ColourOp):
    """Gamma-correct with an exponent in `range` (v -> 255 (v / 255)^gamma)."""

    name = "gamma"

    def colour(self, image: Any, rng: np.random.Generator) -> Any:
        """`image` through a gamma lookup table, the exponent drawn in `range` (every band alike)."""
        g = float(rng.uniform(*self.params.range))
        lut = [min(255, max(0, round(255 * (v / 255) ** g))) for v in range(256)]
        return image.point(lut * len(image.getbands()))


class ColorJitter(ColourOp):
    """Brightness, contrast, saturation (PIL's enhancers, factors drawn in their ranges) and a hue shift, in that
    order; only the parts given run, each with its own draw."""

    name = "color_jitter"

    def colour(self, image: Any, rng: np.random.Generator) -> Any:
        """`image` with each given part applied in `JITTER_ORDER`, its factor (hue: shift) drawn from `rng`."""
        from PIL import Image, ImageEnhance

        enhancers = {"brightness": "Brightness", "contrast": "Contrast", "saturation": "Color"}
        for part in JITTER_ORDER:
            bounds = getattr(self.params, part)
            if bounds is None:
                continue
            value = float(rng.uniform(*bounds))
            if part != "hue":
                image = getattr(ImageEnhance, enhancers[part])(image).enhance(value)
                continue
            mode = image.mode
            h, s, v = image.convert("HSV").split()
            shift = round(value * 256) % 256  # PIL's hue is 0-255 for the full circle
            h = h.point([(i + shift) % 256 for i in range(256)])
            image = Image.merge("HSV", (h, s, v)).convert(mode if mode in ("RGB", "L") else "RGB")
        return image


class Clahe(ColourOp):
    """Contrast-limited adaptive histogram equalisation (`clahe_image`): on the grey level of an L image, on the
    HSV value of an RGB one (hue and saturation kept), as scikit-image's `equalize_adapthist`."""

    name = "clahe"

    def colour(self, image: Any, rng: np.random.Generator) -> Any:
        """`image` equalised (draws nothing from `rng`)."""
        return clahe_image(image, self.params.clip_limit, tuple(self.params.tile_grid))


# ------------------------------------------------------------------------------------------------ CLAHE
#: CLAHE's working grey levels and histogram bins (scikit-image's NR_OF_GRAY and default nbins)
CLAHE_LEVELS = 2**14
CLAHE_BINS = 256


def clahe_image(image: Any, clip_limit: float, tile_grid: tuple[int, int]) -> Any:
    """A PIL image through CLAHE: an L image on its grey levels; otherwise (as RGB) on V = max(R, G, B), every
    channel scaled by V'/V (exactly an HSV round trip with H and S kept; a black pixel becomes grey V')."""
    from PIL import Image

    if image.mode == "L":
        out = clahe_channel(np.asarray(image), clip_limit, tile_grid)
        return Image.fromarray(np.clip(np.round(out * 255), 0, 255).astype(np.uint8), "L")
    rgb = np.asarray(image.convert("RGB")).astype(np.float64)
    v = rgb.max(axis=2)
    v_new = clahe_channel(v.astype(np.uint8), clip_limit, tile_grid) * 255
    scale = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    out = rgb * scale[..., None]
    out[v == 0] = v_new[v == 0, None]
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def clahe_channel(channel: np.ndarray, clip_limit: float, tile_grid: tuple[int, int]) -> np.ndarray:
    """CLAHE of one uint8 channel (H, W) -> floats in [0, 1]; the semantics of scikit-image's
    `equalize_adapthist(channel, kernel_size=(H // down, W // across), clip_limit, nbins=256)`:

    1. levels are stretched to the channel's own min..max over 0 .. 2^14 - 1 and binned (bin width 1 + 2^14 // 256);
    2. the image is reflect-padded so tiles of kh x kw = (H // down, W // across) (at least 1) are centred on a
       grid; each tile's histogram is clipped at max(1, int(clip_limit * kh * kw)) pixels per bin, the excess
       spread over the bins (scikit-image's redistribution), and its cumulative sum is the tile's mapping;
    3. each pixel's value is the bilinear blend of the mappings of the four tiles around it (edge tiles
       repeated), truncated to an integer level, and the result is stretched to [0, 1] by its min..max.

    A constant channel has no contrast to equalise: it comes back as is (v / 255).
    """
    ch = np.asarray(channel)
    if ch.ndim != 2:
        raise ValueError(f"clahe_channel: one channel (H, W), got shape {ch.shape}")
    lo, hi = int(ch.min()), int(ch.max())
    if lo == hi:
        return ch.astype(np.float64) / 255.0
    img = np.round((ch.astype(np.float64) - lo) / (hi - lo) * (CLAHE_LEVELS - 1)).astype(np.int64)
    H, W = img.shape
    across, down = tile_grid
    kh, kw = max(H // down, 1), max(W // across, 1)
    pad = [(kh // 2, (kh - H % kh) % kh + math.ceil(kh / 2)), (kw // 2, (kw - W % kw) % kw + math.ceil(kw / 2))]
    img = np.pad(img, pad, mode="reflect") // (1 + CLAHE_LEVELS // CLAHE_BINS)
    Hp, Wp = img.shape
    nhy, nhx = Hp // kh - 1, Wp // kw - 1  # tiles with a histogram
    tiles = img[kh // 2:kh // 2 + nhy * kh, kw // 2:kw // 2 + nhx * kw]
    tiles = tiles.reshape(nhy, kh, nhx, kw).transpose(0, 2, 1, 3).reshape(nhy * nhx, kh * kw)
    n = kh * kw
    limit = max(1, int(clip_limit * n))
    maps = np.empty((nhy * nhx, CLAHE_BINS), np.int64)
    for t in range(nhy * nhx):
        hist = _clip_histogram(np.bincount(tiles[t], minlength=CLAHE_BINS), limit)
        cdf = np.cumsum(hist).astype(np.float64) * ((CLAHE_LEVELS - 1) / n)
        maps[t] = np.minimum(cdf, CLAHE_LEVELS - 1).astype(np.int64)
    maps = np.pad(maps.reshape(nhy, nhx, CLAHE_BINS), ((1, 1), (1, 1), (0, 0)), mode="edge")
    npy, npx = Hp // kh, Wp // kw
    img = img[:npy * kh, :npx * kw]
    ys, xs = np.arange(npy * kh), np.arange(npx * kw)
    by, bx = (ys // kh)[:, None], (xs // kw)[None, :]
    fy, fx = ((ys % kh) / kh)[:, None], ((xs % kw) / kw)[None, :]
    result = np.zeros(img.shape, np.float32)
    for ey in (0, 1):  # the four neighbouring tiles' mappings, blended bilinearly (float32 as scikit-image)
        for ex in (0, 1):
            weight = (fy if ey else 1 - fy) * (fx if ex else 1 - fx)
            result += (maps[by + ey, bx + ex, img] * weight).astype(np.float32)
    result = result.astype(np.int64)[pad[0][0]:pad[0][0] + H, pad[1][0]:pad[1][0] + W].astype(np.float64)
    rlo, rhi = result.min(), result.max()
    return (result - rlo) / (rhi - rlo) if rhi > rlo else np.zeros_like(result)


def _clip_histogram(hist: np.ndarray, limit: int) -> np.ndarray:
    """`hist` with no bin above `limit`, the excess spread evenly, then one by one (Zuiderveld's redistribution,
    as scikit-image does it)."""
    hist = hist.copy()
    over = hist > limit
    excess = int(hist[over].sum()) - int(over.sum()) * limit
    hist[over] = limit
    incr = excess // hist.size
    upper = limit - incr
    low = hist < upper
    excess -= int(low.sum()) * incr
    hist[low] += incr
    mid = (hist >= upper) & (hist < limit)
    excess += int(hist[mid].sum()) - int(mid.sum()) * limit
    hist[mid] = limit
    while excess > 0:
        before = excess
        for index in range(hist.size):
            under = hist < limit
            step = max(1, int(np.count_nonzero(under)) // excess)
            under = under[index::step]
            view = hist[index::step]
            view[under] += 1
            hist[index::step] = view
            excess -= int(np.count_nonzero(under))
            if excess <= 0:
                break
        if before == excess:
            break
    return hist


#: name -> (op class, params model); the YAML `name` is looked up here, never imported
OPS: dict[str, tuple[type[Op], type[BaseModel]]] = {
    "hflip": (HFlip, FlipParams),
    "vflip": (VFlip, FlipParams),
    "rotate": (Rotate, RotateParams),
    "scale": (Scale, ScaleParams),
    "pad_to_multiple": (PadToMultiple, PadParams),
    "expand_to_fit_affine": (ExpandToFitAffine, ExpandParams),
    "resize_by_scale": (ResizeByScale, ResizeParams),
    "random_crop": (RandomCrop, CropParams),
    "brightness": (Brightness, FactorParams),
    "contrast": (Contrast, FactorParams),
    "saturation": (Saturation, FactorParams),
    "gamma": (Gamma, FactorParams),
    "color_jitter": (ColorJitter, ColorJitterParams),
    "clahe": (Clahe, ClaheParams),
}


class OpSpec(BaseModel):
    """One entry of `data.augmentation.ops`: `{name: NAME, params: {...}}`, checked against the op's own model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description=f"one of: {', '.join(OPS)}")
    params: dict[str, Any] = Field(default_factory=dict, description="the op's parameters (see the README)")
    _parsed: BaseModel | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPS:
            close = difflib.get_close_matches(v, list(OPS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown augmentation op {v!r}{hint}; allowed: {', '.join(OPS)}")
        return v

    @field_validator("params")
    @classmethod
    def _valid_params(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:  # the name was already reported
            return v
        model = OPS[name][1]
        try:
            model.model_validate(v)
        except ValidationError as e:
            allowed = ", ".join(f"{k} (default {f.default!r})" for k, f in model.model_fields.items())
            problems = []
            for err in e.errors(include_url=False):
                key = ".".join(str(p) for p in err["loc"]) or "params"
                what = ("unknown parameter" if err["type"] == "extra_forbidden"
                        else err["msg"].removeprefix("Value error, "))
                if err["type"] not in ("extra_forbidden", "value_error") and not isinstance(err.get("input"), dict):
                    what += f" (got {err['input']!r})"
                problems.append(f"{key}: {what}")
            raise ValueError(f"{'; '.join(problems)}; {name} takes: {allowed}") from None
        return v

    @property
    def parsed(self) -> BaseModel:
        """The validated parameters as the op's own model."""
        if self._parsed is None:
            self._parsed = OPS[self.name][1].model_validate(self.params)
        return self._parsed


class AugmentationConfig(BaseModel):
    """`data.augmentation`: geometry-aware augmentation of training samples (never of eval samples)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    bypass_prob: float = Field(0.0, ge=0, le=1, description="share of samples left unaugmented")
    fill: tuple[int, int, int] = Field((0, 0, 0), description="RGB of the area a warp uncovers")
    degenerate: Literal["clamp", "drop"] = Field(
        "clamp", description="an object a warp leaves nothing of: clamp (its vertices clamped into the image, "
                             "as the origin documents do; dropped only when that has no area either) or drop; "
                             "counted either way")
    ops: list[OpSpec] = Field(default_factory=list, description="applied in order; colour ops after all others")


# ------------------------------------------------------------------------------------------- pipeline
@dataclass
class Result:
    """An augmented sample: the image (None in geometry-only mode), its size, the objects, and telemetry."""

    image: Any
    width: int
    height: int
    items: list[Item]
    applied: dict[str, int]
    dropped_degenerate: int
    dropped_by_crop: int
    crop_coverages: list[float]
    bypassed: bool
    clamped_degenerate: int = 0


class Augmenter:
    """Runs an `AugmentationConfig` on one record; the random draws depend on (seed, epoch, index) only."""

    def __init__(self, config: AugmentationConfig):
        self.config = config
        self.ops = [OPS[spec.name][0](spec.parsed) for spec in config.ops]

    @property
    def active(self) -> bool:
        """Whether any sample can change."""
        return self.config.enabled and bool(self.ops) and self.config.bypass_prob < 1.0

    def generators(self, seed: int, index: int) -> list[np.random.Generator]:
        """One generator for the bypass draw, then one per op (independent streams)."""
        children = np.random.SeedSequence([int(seed) % 2**63, int(index)]).spawn(len(self.ops) + 1)
        return [np.random.default_rng(c) for c in children]

    def __call__(self, width: int, height: int, objects: list[tuple[G.Geometry, str]], *, seed: int, index: int,
                 image: Any = None) -> Result:
        """Augment one record (`seed` is the epoch's seed, `index` the record's position in the data set)."""
        state = State(width, height, [Item(g, d, i) for i, (g, d) in enumerate(objects)], image,
                      tuple(self.config.fill), degenerate=self.config.degenerate)
        if not self.active:
            return self._result(state, bypassed=False)
        rngs = self.generators(seed, index)
        if self.config.bypass_prob > 0 and rngs[0].random() < self.config.bypass_prob:
            return self._result(state, bypassed=True)
        colour: list[tuple[ColourOp, np.random.Generator]] = []
        for op, rng in zip(self.ops, rngs[1:]):
            if not op.draw(rng):
                continue
            state.applied[op.name] += 1
            if isinstance(op, AffineOp):
                state.pending = op.matrix(state, rng) @ state.pending
            elif isinstance(op, BarrierOp):
                op.apply(state, rng)
            else:
                colour.append((op, rng))  # after every geometric op
        if not np.array_equal(state.pending, G.identity()):
            state.warp(G.identity(), (state.width, state.height))
        if state.image is not None:
            for op, rng in colour:
                state.image = op.colour(state.image, rng)
        return self._result(state, bypassed=False)

    @staticmethod
    def _result(state: State, *, bypassed: bool) -> Result:
        return Result(state.image, state.width, state.height, state.items, dict(state.applied),
                      state.dropped_degenerate, state.dropped_by_crop, state.crop_coverages, bypassed,
                      state.clamped_degenerate)


# ------------------------------------------------------------------------------------------ telemetry
COVERAGE_BINS = 10


class Telemetry:
    """Counts over many samples: per-op applications, objects dropped, a histogram of crop coverages."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, result: Result, objects_in: int) -> None:
        """Count one augmented sample."""
        c = self.counts
        c["samples"] += 1
        c["bypassed"] += int(result.bypassed)
        c["objects_in"] += objects_in
        c["objects_out"] += len({it.index for it in result.items})
        c["dropped_by_crop"] += result.dropped_by_crop
        c["dropped_degenerate"] += result.dropped_degenerate
        c["clamped_degenerate"] += result.clamped_degenerate
        for name, n in result.applied.items():
            c[f"op.{name}"] += n
        for cov in result.crop_coverages:
            c[f"coverage.{min(COVERAGE_BINS - 1, int(cov * COVERAGE_BINS))}"] += 1

    @staticmethod
    def summary(counts: dict[str, float]) -> dict[str, Any]:
        """A readable summary: totals, per-op counts and the coverage histogram (bins of 0.1)."""
        out: dict[str, Any] = {k: int(v) for k, v in sorted(counts.items()) if "." not in k}
        out["ops"] = {k[3:]: int(v) for k, v in sorted(counts.items()) if k.startswith("op.")}
        out["crop_coverage_histogram"] = {
            f"{b / COVERAGE_BINS:.1f}-{(b + 1) / COVERAGE_BINS:.1f}": int(counts.get(f"coverage.{b}", 0))
            for b in range(COVERAGE_BINS)}
        return out

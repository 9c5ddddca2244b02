"""Inpainting masks of DPS, Palette and the LD-SMC release, drawn from an explicit generator.

Convention: 1 = observed pixel, 0 = missing. Every mask is ``[1, H, W]`` float32 (one
mask for all channels); ``InpaintingOperator.set_mask`` broadcasts it. Layout follows
DPS's ``mask_generator(mask_type, mask_len_range, mask_prob_range, image_size, margin)``:

- ``box``: an h x w hole, h, w ~ randint(mask_len_range) (upper end exclusive, so
  [128, 129] gives 128), top-left corner ~ randint(margin, image_size - margin - side).
- ``random``: a fraction p ~ U(mask_prob_range) of the pixels (int(p H W) of them, drawn
  without replacement) is missing.
- ``extreme``: 1 - box (only the box is observed; outpainting).
- ``freeform``: the release's ``random_irregular_mask`` (its ``scripts/utils.py``): 1-2
  strokes of 16-31 segments drawn as ``cv2.line(..., 20)`` (our pixel-exact port of OpenCV's
  code, ``_cv_line``), redrawn until 5 % < missing < 50 % (``free_form_area``).
- ``palette_freeform``: Palette-style brush strokes (random zig-zag polylines of random
  width with round joints), redrawn until the missing area lies in ``free_form_area``.
- ``free_form`` (DPS's and the release's name) is refused: say ``freeform`` or ``palette_freeform``.

``mask_for_index(cfg, seed, index)`` seeds a generator from (seed, index) so image i gets
the same mask in every run, whatever the batch it is in.
"""
from __future__ import annotations

import inspect
import math
import zlib
from typing import Mapping, Sequence

import numpy as np
import torch

MASK_TYPES = ("box", "random", "extreme", "freeform", "palette_freeform")

# The release's random_irregular_mask, on its 256 px canvas: strokes ~ randint(1, 3), segments per
# stroke ~ randint(16, 32), angles 0.01 + randint(0, 64) radians, lengths ~ randint(10, 40) px,
# cv2 thickness 20 (a line 21 px wide: half-width 10 px, round caps of radius 10).
RELEASE_CANVAS = 256
RELEASE_STROKES, RELEASE_SEGMENTS, RELEASE_MAX_ANGLE = (1, 3), (16, 32), 64
RELEASE_LENGTHS, RELEASE_THICKNESS = (10, 40), 20


def derive_seed(seed: int, index: int, stream: str = "mask") -> int:
    """A 63-bit seed that depends on (seed, index, stream), well mixed (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(index), zlib.crc32(stream.encode())]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator_for_index(seed: int, index: int, stream: str = "mask", device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, index, stream)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, index, stream))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high) (numpy ``randint`` semantics)."""
    return int(torch.randint(int(low), int(high), (1,), generator=g, device=g.device))


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64, device=g.device))


def _pair(v, what: str) -> tuple:
    if isinstance(v, (int, float)):
        return (v, v)
    if isinstance(v, Sequence) and len(v) == 2:
        return tuple(v)
    raise ValueError(f"{what} must be a number or a pair (low, high), got {v!r}")


class MaskGenerator:
    """Draws DPS/Palette inpainting masks: ``MaskGenerator(...)(generator) -> [1, H, W]``.

    ``margin`` defaults to DPS's (16, 16) scaled by image_size / 256 (2 px at 32 px).
    ``freeform`` follows the release (``release_strokes``). ``palette_freeform`` uses
    Palette's defaults scaled to the image: 4-12 vertices, up to
    ``max_strokes - 1`` strokes per attempt, widths 12-40 px at 256, segment lengths
    ~ N(R, R/2) clipped to [0, 2R] with R = sqrt(H^2 + W^2) / 8, turning angles
    2 pi / 5 +- U(0, 2 pi / 15), and a random left-right / up-down flip after each stroke.
    """

    def __init__(self, mask_type: str, mask_len_range=None, mask_prob_range=None, image_size: int = 256,
                 margin=None, free_form_area=(0.05, 0.5), max_strokes: int = 4, max_tries: int = 1000):
        if mask_type == "free_form":
            raise ValueError("mask_type 'free_form' is ambiguous: choose 'freeform' (the LD-SMC release's "
                             "random_irregular_mask, what its free_form meant) or 'palette_freeform' "
                             "(Palette-style brush strokes, this project's former free_form)")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"unknown mask_type '{mask_type}'; valid: {', '.join(MASK_TYPES)}")
        self.mask_type, self.image_size = mask_type, int(image_size)
        if margin is None:
            m = int(round(16 * self.image_size / 256))
            margin = (m, m)
        self.margin = tuple(int(v) for v in _pair(margin, "margin"))
        self.free_form_area = tuple(float(v) for v in _pair(free_form_area, "free_form_area"))
        self.max_strokes, self.max_tries = int(max_strokes), int(max_tries)
        self.mask_len_range = self.mask_prob_range = None
        if mask_type in ("box", "extreme"):
            if mask_len_range is None:
                raise ValueError(f"mask_type '{mask_type}' needs mask_len_range, e.g. [128, 129]")
            lo, hi = (int(v) for v in _pair(mask_len_range, "mask_len_range"))
            hi = max(hi, lo + 1)  # [l, l] means exactly l
            for axis, mg in zip("hw", self.margin):
                if self.image_size - mg - (hi - 1) <= mg:
                    raise ValueError(f"a box of side up to {hi - 1} with margin {mg} does not fit in "
                                     f"{self.image_size} px: lower mask_len_range or margin")
            self.mask_len_range = (lo, hi)
        if mask_type == "random":
            if mask_prob_range is None:
                raise ValueError("mask_type 'random' needs mask_prob_range, e.g. [0.3, 0.7]")
            lo, hi = (float(v) for v in _pair(mask_prob_range, "mask_prob_range"))
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"mask_prob_range must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")
            self.mask_prob_range = (lo, hi)
        a_lo, a_hi = self.free_form_area
        if not 0.0 <= a_lo < a_hi <= 1.0:
            raise ValueError(f"free_form_area must satisfy 0 <= low < high <= 1, got {self.free_form_area}")

    @classmethod
    def from_config(cls, cfg: Mapping) -> "MaskGenerator":
        """Build from a task YAML's ``mask_opt`` mapping (DPS keys); unknown keys are named."""
        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise TypeError(f"mask_opt has unknown key(s) {unknown}; valid keys: {valid}")
        return cls(**dict(cfg))

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(generator, torch.Generator):
            raise TypeError("MaskGenerator needs an explicit torch.Generator, "
                            "e.g. util.masks.generator_for_index(seed, i)")
        if self.mask_type == "box":
            return self.box(generator)[0]
        if self.mask_type == "extreme":
            return 1.0 - self.box(generator)[0]
        if self.mask_type == "random":
            return self.random(generator)
        if self.mask_type == "freeform":
            return self.freeform(generator)
        return self.palette_freeform(generator)

    def box(self, g: torch.Generator):
        """A box hole: (mask [1, H, W], (top, bottom, left, right)) with rows top:bottom missing."""
        n = self.image_size
        h, w = _randint(g, *self.mask_len_range), _randint(g, *self.mask_len_range)
        top = _randint(g, self.margin[0], n - self.margin[0] - h)
        left = _randint(g, self.margin[1], n - self.margin[1] - w)
        mask = torch.ones(1, n, n, device=g.device)
        mask[:, top:top + h, left:left + w] = 0.0
        return mask, (top, top + h, left, left + w)

    def random(self, g: torch.Generator) -> torch.Tensor:
        """int(p H W) pixels missing, p ~ U(mask_prob_range)."""
        n = self.image_size
        p = _uniform(g, *self.mask_prob_range)
        missing = torch.randperm(n * n, generator=g, device=g.device)[: int(n * n * p)]
        mask = torch.ones(n * n, device=g.device)
        mask[missing] = 0.0
        return mask.view(1, n, n)

    @property
    def release_thickness(self) -> int:
        """cv2 thickness of the release's strokes here: 2 round(10 s) (Python's round), at least 2 (3 px wide)."""
        return 2 * max(1, round(RELEASE_THICKNESS / 2 * self.image_size / RELEASE_CANVAS))

    def release_strokes(self, g: torch.Generator) -> list:
        """The stroke polylines of one draw of the release's ``random_irregular_mask``.

        Returns 1-2 strokes (randint(1, 3)), each a list of 17-32 integer vertices
        ``(row, col)`` in this image's pixels: start (row, col) ~ randint(256)^2, then
        randint(16, 32) segments with angles randint(0, 64) and lengths randint(10, 40),
        walked by ``release_walk`` on the release's 256 px canvas. A canvas vertex v maps to
        ``floor((v + 0.5) s)``, s = image_size / 256: the identity at 256 px, else the pixel
        that holds the scaled pixel centre. Draws come in the release's order (it also draws
        its constant widths, randint(20, 21), which we skip).
        """
        s = self.image_size / RELEASE_CANVAS
        strokes = []
        for i in range(_randint(g, *RELEASE_STROKES)):
            row, col = _randint(g, 0, RELEASE_CANVAS), _randint(g, 0, RELEASE_CANVAS)
            n = _randint(g, *RELEASE_SEGMENTS)
            angles = torch.randint(0, RELEASE_MAX_ANGLE, (n,), generator=g, device=g.device).tolist()
            lengths = torch.randint(*RELEASE_LENGTHS, (n,), generator=g, device=g.device).tolist()
            walk = release_walk(row, col, angles, lengths, i)
            strokes.append([(math.floor((r + 0.5) * s), math.floor((c + 0.5) * s)) for r, c in walk])
        return strokes

    def draw_strokes(self, strokes) -> np.ndarray:
        """Boolean hole ``[H, W]``: every segment drawn as ``cv2.line(hole, (c0, r0), (c1, r1), 1,
        release_thickness)`` (each segment with its own round caps, as the release)."""
        hole = np.zeros((self.image_size, self.image_size), dtype=bool)
        for stroke in strokes:
            for (r0, c0), (r1, c1) in zip(stroke[:-1], stroke[1:]):
                _cv_line(hole, (c0, r0), (c1, r1), self.release_thickness)
        return hole

    def freeform(self, g: torch.Generator) -> torch.Tensor:
        """The release's free-form mask: strokes redrawn until lo < missing fraction < hi (strict, as there)."""
        lo, hi = self.free_form_area
        for _ in range(self.max_tries):
            hole = self.draw_strokes(self.release_strokes(g))
            if lo < hole.mean() < hi:
                return torch.from_numpy(~hole).float()[None].to(g.device)
        raise RuntimeError(f"no free-form mask with area in {self.free_form_area} after {self.max_tries} "
                           f"tries at {self.image_size} px: widen free_form_area")

    def palette_freeform(self, g: torch.Generator) -> torch.Tensor:
        """Palette brush strokes, redrawn until the missing fraction is within ``free_form_area``."""
        lo, hi = self.free_form_area
        for _ in range(self.max_tries):
            hole = self._strokes(g)
            if lo <= float(hole.float().mean()) <= hi:
                return (~hole).float()[None]
        raise RuntimeError(f"no free-form mask with area in {self.free_form_area} after {self.max_tries} "
                           f"tries at {self.image_size} px: widen free_form_area")

    def _strokes(self, g: torch.Generator) -> torch.Tensor:
        """Boolean [H, W] hole drawn with up to max_strokes - 1 random Palette polylines."""
        n = self.image_size
        R = math.sqrt(2.0 * n * n) / 8.0
        s = n / 256.0
        w_lo, w_hi = max(1.0, 12 * s), max(2.0, 40 * s)
        mean_angle, angle_range = 2 * math.pi / 5, 2 * math.pi / 15
        yy, xx = torch.meshgrid(torch.arange(n, device=g.device, dtype=torch.float32),
                                torch.arange(n, device=g.device, dtype=torch.float32), indexing="ij")
        hole = torch.zeros(n, n, dtype=torch.bool, device=g.device)
        for _ in range(_randint(g, 0, self.max_strokes)):
            num_vertex = _randint(g, 4, 12)
            a_min = mean_angle - _uniform(g, 0, angle_range)
            a_max = mean_angle + _uniform(g, 0, angle_range)
            v = [(float(_randint(g, 0, n)), float(_randint(g, 0, n)))]
            for i in range(num_vertex):
                angle = _uniform(g, a_min, a_max)
                angle = 2 * math.pi - angle if i % 2 == 0 else angle
                r = min(max(R + R / 2 * float(torch.randn((), generator=g, device=g.device)), 0.0), 2 * R)
                x = min(max(v[-1][0] + r * math.cos(angle), 0.0), n)
                y = min(max(v[-1][1] + r * math.sin(angle), 0.0), n)
                v.append((x, y))
            radius = _uniform(g, w_lo, w_hi) / 2.0
            for (x0, y0), (x1, y1) in zip(v[:-1], v[1:]):
                # Only the segment's bounding box (grown by the radius) can change.
                r0, r1 = max(0, int(min(y0, y1) - radius)), min(n, int(max(y0, y1) + radius) + 2)
                c0, c1 = max(0, int(min(x0, x1) - radius)), min(n, int(max(x0, x1) + radius) + 2)
                hole[r0:r1, c0:c1] |= _capsule(xx[r0:r1, c0:c1], yy[r0:r1, c0:c1], x0, y0, x1, y1, radius)
            # Palette means to flip the drawing at random after each stroke (its PIL call
            # discards the result); we do flip, so strokes are not biased to one direction.
            if float(torch.randn((), generator=g, device=g.device)) > 0:
                hole = hole.flip(1)
            if float(torch.randn((), generator=g, device=g.device)) > 0:
                hole = hole.flip(0)
        return hole


def release_walk(row: int, col: int, angles, lengths, stroke_index: int) -> list:
    """One stroke of the release's random walk on its 256 px canvas, in its arithmetic.

    ``angle = 0.01 + a`` radians (``2 pi - angle`` when ``stroke_index`` is even), then
    ``(row, col) <- (int(row + L sin angle), int(col + L cos angle))``, truncating toward
    zero as numpy's ``astype(np.int32)``. Returns the vertices ``[(row, col), ...]``; they
    may leave the canvas (the drawing clips). The release names row ``x`` and column ``y``
    and draws ``cv2.line(mask, (y0, x0), (y1, x1), ...)``.
    """
    walk = [(row, col)]
    for a, length in zip(angles, lengths):
        angle = 0.01 + a
        if stroke_index % 2 == 0:
            angle = 2 * math.pi - angle
        row, col = int(row + length * math.sin(angle)), int(col + length * math.cos(angle))
        walk.append((row, col))
    return walk


def _capsule(xx, yy, x0, y0, x1, y1, radius) -> torch.Tensor:
    """Pixels within ``radius`` of the segment (x0, y0)-(x1, y1): a thick line with round ends."""
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = ((xx - x0) * dx + (yy - y0) * dy) / length2 if length2 > 0 else torch.zeros_like(xx)
    t = t.clamp(0.0, 1.0)
    return (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2 <= radius * radius


# --- OpenCV's cv2.line(img, p0, p1, 1, thickness), LINE_8, shift 0, thickness >= 2 -------------
# OpenCV (imgproc/src/drawing.cpp: ThickLine, FillConvexPoly, Line2, clipLine, Circle) draws a
# thick line as a quadrilateral in 16.16 fixed point, offset by the rounded half-width normal to
# the segment, scan-filled and outlined, plus a filled midpoint circle at each end. Below is the
# same integer arithmetic (C's truncating division, cvRound's round-half-even), checked pixel for
# pixel against opencv-python-headless 4.10.0.84 (the release's version); see docs/operators.md.
_SHIFT, _ONE, _HALF = 16, 1 << 16, 1 << 15


def _cdiv(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _put(img: np.ndarray, xs, ys) -> None:
    xs, ys = np.asarray(xs), np.asarray(ys)
    inside = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[inside], xs[inside]] = True


def _hline(img: np.ndarray, y: int, x0: int, x1: int) -> None:
    """Pixels x0..x1 (inclusive) of row y, clipped to the image."""
    if 0 <= y < img.shape[0] and x1 >= 0 and x0 < img.shape[1]:
        img[y, max(x0, 0):min(x1, img.shape[1] - 1) + 1] = True


def _clip_line(w: int, h: int, x1: int, y1: int, x2: int, y2: int):
    """cv::clipLine on fixed-point coordinates: (visible, x1, y1, x2, y2)."""
    right, bottom = w - 1, h - 1

    def code(x, y):
        return (x < 0) + (x > right) * 2 + (y < 0) * 4 + (y > bottom) * 8

    c1, c2 = code(x1, y1), code(x2, y2)
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1, y1 = x1 + int(float(a - y1) * (x2 - x1) / (y2 - y1)), a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2, y2 = x2 + int(float(a - y2) * (x2 - x1) / (y2 - y1)), a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                x1, y1, c1 = a, y1 + int(float(a - x1) * (y2 - y1) / (x2 - x1)), 0
            if c2:
                a = 0 if c2 == 1 else right
                x2, y2, c2 = a, y2 + int(float(a - x2) * (y2 - y1) / (x2 - x1)), 0
    return (c1 | c2) == 0, x1, y1, x2, y2


def _line_fixed(img: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> None:
    """cv::Line2: a one-pixel 8-connected line between fixed-point points (DDA on the major axis)."""
    visible, x1, y1, x2, y2 = _clip_line(img.shape[1] << _SHIFT, img.shape[0] << _SHIFT, x1, y1, x2, y2)
    if not visible:
        return
    if abs(x2 - x1) > abs(y2 - y1):
        if x2 < x1:
            x1, y1, x2, y2 = x2, y2, x1, y1
        _put(img, [(x2 + _HALF) >> _SHIFT], [(y2 + _HALF) >> _SHIFT])  # the far end, as OpenCV
        k = np.arange(((x2 - x1) >> _SHIFT) + 1, dtype=np.int64)
        step = _cdiv((y2 - y1) << _SHIFT, (x2 - x1) | 1)
        _put(img, ((x1 + _HALF) >> _SHIFT) + k, (y1 + _HALF + k * step) >> _SHIFT)
    else:
        if y2 < y1:
            x1, y1, x2, y2 = x2, y2, x1, y1
        _put(img, [(x2 + _HALF) >> _SHIFT], [(y2 + _HALF) >> _SHIFT])
        k = np.arange(((y2 - y1) >> _SHIFT) + 1, dtype=np.int64)
        step = _cdiv((x2 - x1) << _SHIFT, (y2 - y1) | 1)
        _put(img, (x1 + _HALF + k * step) >> _SHIFT, ((y1 + _HALF) >> _SHIFT) + k)


def _fill_convex_fixed(img: np.ndarray, v: list) -> None:
    """cv::FillConvexPoly (LINE_8, shift 16): outline with ``_line_fixed``, then scan-fill rows."""
    h, w, n = img.shape[0], img.shape[1], len(v)
    for p, q in zip([v[-1]] + v[:-1], v):
        _line_fixed(img, p[0], p[1], q[0], q[1])
    xs, ys = [p[0] for p in v], [p[1] for p in v]
    imin = ys.index(min(ys))
    xmin, xmax = (min(xs) + _HALF) >> _SHIFT, (max(xs) + _HALF) >> _SHIFT
    y, ymax = (min(ys) + _HALF) >> _SHIFT, (max(ys) + _HALF) >> _SHIFT
    if xmax < 0 or ymax < 0 or xmin >= w or y >= h:
        return
    ymax = min(ymax, h - 1)
    # Two edges walk from the top vertex, one each way round; x advances by a rounded slope per row.
    idx, di, x, dx, ye = [imin, imin], [1, n - 1], [-_ONE, -_ONE], [0, 0], [y, y]
    edges = n
    while True:
        for i in range(2):
            if y < ye[i]:
                continue
            i0, i1 = idx[i], (idx[i] + di[i]) % n
            while True:
                edges -= 1
                if edges < 0:
                    break
                ty = (v[i1][1] + _HALF) >> _SHIFT
                if ty > y:
                    ye[i], idx[i], x[i] = ty, i1, v[i0][0]
                    dx[i] = _cdiv((v[i1][0] - v[i0][0]) * 2 + (ty - y), 2 * (ty - y))
                    break
                i0, i1 = i1, (i1 + di[i]) % n
        if edges < 0:
            break
        _hline(img, y, (min(x) + _HALF) >> _SHIFT, (max(x) + _HALF) >> _SHIFT)
        x = [x[0] + dx[0], x[1] + dx[1]]
        y += 1
        if y > ymax:
            break


def _disc(img: np.ndarray, cx: int, cy: int, radius: int) -> None:
    """cv::Circle(fill=1): the midpoint circle's spans."""
    err, dx, dy, plus, minus = 0, radius, 0, 1, 2 * radius - 1
    while dx >= dy:
        for yy, half in ((cy - dy, dx), (cy + dy, dx), (cy - dx, dy), (cy + dx, dy)):
            _hline(img, yy, cx - half, cx + half)
        dy, err, plus = dy + 1, err + plus, plus + 2
        if err > 0:
            err, dx, minus = err - minus, dx - 1, minus - 2


def _cv_line(img: np.ndarray, p0, p1, thickness: int) -> None:
    """Set the pixels of ``cv2.line(img, p0, p1, 1, thickness)`` (points (x, y) = (col, row))."""
    if thickness < 2:
        raise ValueError(f"thickness must be at least 2 (thinner lines use another OpenCV path), got {thickness}")
    x0, y0, x1, y1 = p0[0] << _SHIFT, p0[1] << _SHIFT, p1[0] << _SHIFT, p1[1] << _SHIFT
    half = thickness << (_SHIFT - 1)  # thickness / 2 in fixed point
    ddx, ddy = (x0 - x1) / _ONE, (y1 - y0) / _ONE
    r2 = ddx * ddx + ddy * ddy
    if r2 > 2.220446049250313e-16:  # DBL_EPSILON: not a single point
        r = (half + (thickness & 1) * _ONE * 0.5) / math.sqrt(r2)
        ox, oy = round(ddy * r), round(ddx * r)  # cvRound: half to even, as Python's round
        _fill_convex_fixed(img, [(x0 + ox, y0 + oy), (x0 - ox, y0 - oy), (x1 - ox, y1 - oy), (x1 + ox, y1 + oy)])
    for x, y in ((x0, y0), (x1, y1)):
        _disc(img, (x + _HALF) >> _SHIFT, (y + _HALF) >> _SHIFT, (half + _HALF) >> _SHIFT)


def mask_for_index(cfg, seed: int, index: int, device="cpu") -> torch.Tensor:
    """The mask ``[1, H, W]`` of image ``index``: ``cfg`` (mask_opt mapping or MaskGenerator)
    drawn with ``generator_for_index(seed, index, "mask")``; the same in every run."""
    gen = cfg if isinstance(cfg, MaskGenerator) else MaskGenerator.from_config(cfg)
    return gen(generator_for_index(seed, index, "mask")).to(device)

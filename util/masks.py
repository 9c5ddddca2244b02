"""Inpainting masks of the DPS / Palette task suite, drawn from an explicit generator.

Convention: 1 = observed pixel, 0 = missing. Every mask is ``[1, H, W]`` float32 (one
mask for all channels); ``InpaintingOperator.set_mask`` broadcasts it. Layout follows
DPS's ``mask_generator(mask_type, mask_len_range, mask_prob_range, image_size, margin)``:

- ``box``: an h x w hole, h, w ~ randint(mask_len_range) (upper end exclusive, so
  [128, 129] gives 128), top-left corner ~ randint(margin, image_size - margin - side).
- ``random``: a fraction p ~ U(mask_prob_range) of the pixels (int(p H W) of them, drawn
  without replacement) is missing.
- ``extreme``: 1 - box (only the box is observed; outpainting).
- ``free_form``: Palette-style brush strokes (random zig-zag polylines of random width
  with round joints), redrawn until the missing area lies in ``free_form_area``
  (default 5 % to 50 %).

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

MASK_TYPES = ("box", "random", "extreme", "free_form")


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
    Free-form strokes use Palette's defaults scaled to the image: 4-12 vertices, up to
    ``max_strokes - 1`` strokes per attempt, widths 12-40 px at 256, segment lengths
    ~ N(R, R/2) clipped to [0, 2R] with R = sqrt(H^2 + W^2) / 8, turning angles
    2 pi / 5 +- U(0, 2 pi / 15), and a random left-right / up-down flip after each stroke.
    """

    def __init__(self, mask_type: str, mask_len_range=None, mask_prob_range=None, image_size: int = 256,
                 margin=None, free_form_area=(0.05, 0.5), max_strokes: int = 4, max_tries: int = 1000):
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
        return self.free_form(generator)

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

    def free_form(self, g: torch.Generator) -> torch.Tensor:
        """Brush strokes, redrawn until the missing fraction is within ``free_form_area``."""
        lo, hi = self.free_form_area
        for _ in range(self.max_tries):
            hole = self._strokes(g)
            if lo <= float(hole.float().mean()) <= hi:
                return (~hole).float()[None]
        raise RuntimeError(f"no free-form mask with area in {self.free_form_area} after {self.max_tries} "
                           f"tries at {self.image_size} px: widen free_form_area")

    def _strokes(self, g: torch.Generator) -> torch.Tensor:
        """Boolean [H, W] hole drawn with up to max_strokes - 1 random polylines."""
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


def _capsule(xx, yy, x0, y0, x1, y1, radius) -> torch.Tensor:
    """Pixels within ``radius`` of the segment (x0, y0)-(x1, y1): a thick line with round ends."""
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = ((xx - x0) * dx + (yy - y0) * dy) / length2 if length2 > 0 else torch.zeros_like(xx)
    t = t.clamp(0.0, 1.0)
    return (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2 <= radius * radius


def mask_for_index(cfg, seed: int, index: int, device="cpu") -> torch.Tensor:
    """The mask ``[1, H, W]`` of image ``index``: ``cfg`` (mask_opt mapping or MaskGenerator)
    drawn with ``generator_for_index(seed, index, "mask")``; the same in every run."""
    gen = cfg if isinstance(cfg, MaskGenerator) else MaskGenerator.from_config(cfg)
    return gen(generator_for_index(seed, index, "mask")).to(device)

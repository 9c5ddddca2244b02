"""Masks: DPS box / random / extreme layouts, the release's free-form masks (distribution and
OpenCV's rasterisation), Palette free-form area, per-index reproducibility."""
import hashlib
import math

import numpy as np
import pytest
import torch

from util.masks import MaskGenerator, _cv_line, derive_seed, generator_for_index, mask_for_index, release_walk


def _hole_bounds(mask):
    rows = torch.nonzero((mask[0] == 0).any(dim=1)).flatten()
    cols = torch.nonzero((mask[0] == 0).any(dim=0)).flatten()
    return rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1


def test_box_size_and_position_bounds():
    gen = MaskGenerator("box", mask_len_range=(40, 60), image_size=128)
    assert gen.margin == (8, 8)  # DPS's 16 px scaled to 128 px
    sides = set()
    for i in range(40):
        m = gen(generator_for_index(0, i))
        assert m.shape == (1, 128, 128) and set(m.unique().tolist()) == {0.0, 1.0}
        top, bottom, left, right = _hole_bounds(m)
        h, w = bottom - top, right - left
        assert 40 <= h < 60 and 40 <= w < 60
        assert (m == 0).sum() == h * w  # one solid rectangle
        assert top >= 8 and left >= 8
        assert top < 128 - 8 - h and left < 128 - 8 - w  # randint's exclusive upper end
        sides.update([h, w])
    assert len(sides) > 5


def test_dps_box_is_128_at_256():
    m = mask_for_index({"mask_type": "box", "mask_len_range": [128, 129], "image_size": 256}, seed=1, index=0)
    top, bottom, left, right = _hole_bounds(m)
    assert (bottom - top, right - left) == (128, 128)
    assert 16 <= top < 256 - 16 - 128 and 16 <= left < 256 - 16 - 128


def test_demo_sized_box_with_explicit_margin():
    cfg = {"mask_type": "box", "mask_len_range": (16, 17), "image_size": 32, "margin": (4, 4)}
    for i in range(10):
        top, bottom, left, right = _hole_bounds(mask_for_index(cfg, 0, i))
        assert bottom - top == 16 and 4 <= top < 32 - 4 - 16 and 4 <= left < 32 - 4 - 16
    with pytest.raises(ValueError, match="does not fit"):
        MaskGenerator("box", mask_len_range=(28, 29), image_size=32, margin=(4, 4))


def test_extreme_is_the_complement_of_the_box():
    box = MaskGenerator("box", mask_len_range=(20, 30), image_size=64)(torch.Generator().manual_seed(3))
    extreme = MaskGenerator("extreme", mask_len_range=(20, 30), image_size=64)(torch.Generator().manual_seed(3))
    torch.testing.assert_close(extreme, 1 - box)


def test_random_fraction():
    gen = MaskGenerator("random", mask_prob_range=(0.3, 0.7), image_size=64)
    fractions = []
    for i in range(30):
        m = gen(generator_for_index(2, i))
        missing = int((m == 0).sum())
        fractions.append(missing / 64 ** 2)
        assert int(0.3 * 64 ** 2) <= missing <= int(0.7 * 64 ** 2)
    assert max(fractions) - min(fractions) > 0.1  # p is drawn per image
    exact = MaskGenerator("random", mask_prob_range=(0.5, 0.5), image_size=32)(torch.Generator().manual_seed(0))
    assert int((exact == 0).sum()) == 512


@pytest.mark.parametrize("size", [256, 32])
def test_palette_freeform_area_range(size):
    gen = MaskGenerator("palette_freeform", image_size=size)
    areas = []
    for i in range(6):
        m = gen(generator_for_index(0, i))
        assert m.shape == (1, size, size) and set(m.unique().tolist()) <= {0.0, 1.0}
        areas.append(1 - m.mean().item())
    assert all(0.05 <= a <= 0.5 for a in areas)
    assert len(set(areas)) > 3


def test_mask_for_index_is_reproducible_whatever_the_order():
    cfg = {"mask_type": "freeform", "image_size": 64}
    forward = [mask_for_index(cfg, 5, i) for i in range(4)]
    backward = [mask_for_index(cfg, 5, i) for i in reversed(range(4))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
    assert not torch.equal(forward[0], forward[1])
    assert not torch.equal(forward[0], mask_for_index(cfg, 6, 0))
    assert derive_seed(5, 0, "mask") != derive_seed(5, 0, "noise")


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match="valid: box, random, extreme, freeform, palette_freeform"):
        MaskGenerator("both")
    with pytest.raises(ValueError, match="needs mask_len_range"):
        MaskGenerator("box")
    with pytest.raises(ValueError, match="needs mask_prob_range"):
        MaskGenerator("random")
    with pytest.raises(TypeError, match="explicit torch.Generator"):
        MaskGenerator("random", mask_prob_range=(0.1, 0.2))(None)


# --- The release's free-form masks (mask_type: freeform) ---------------------------------------

def _digest(hole) -> str:
    return hashlib.sha256(np.packbits(np.asarray(hole, dtype=bool)).tobytes()).hexdigest()[:16]


# cv2.line(np.zeros((h, w), np.uint8), p0, p1, 1, thickness) with opencv-python-headless 4.10.0.84
# (the release's pin): (shape, p0, p1, thickness, pixels set, _digest of the result).
OPENCV_LINES = [
    ((40, 40), (5, 20), (35, 20), 20, 820, "0df64c671b5883f8"),
    ((40, 40), (20, 3), (20, 36), 2, 104, "6fe9005619deb9df"),
    ((40, 40), (-7, -9), (30, 41), 3, 239, "6314c0198caf19a2"),
    ((33, 47), (50, -10), (-12, 25), 7, 341, "74015199514f7b59"),
    ((64, 64), (32, 32), (32, 32), 20, 317, "f06ca06d5d73d86e"),
    ((64, 64), (10, 60), (11, 2), 20, 1333, "3a9013264822bc81"),
    ((64, 64), (-30, 70), (90, -5), 20, 1576, "010857321e2dab0e"),
    ((24, 24), (3, 4), (5, 5), 2, 10, "7fe4c4457844a62b"),
    ((48, 32), (31, 47), (0, 0), 4, 278, "5df035fab74cda80"),
    ((64, 64), (0, 13), (63, 15), 21, 1472, "c41abac43d4c6883"),
]


@pytest.mark.parametrize("shape, p0, p1, thickness, count, digest", OPENCV_LINES)
def test_thick_line_is_opencvs_pixel_for_pixel(shape, p0, p1, thickness, count, digest):
    hole = np.zeros(shape, dtype=bool)
    _cv_line(hole, p0, p1, thickness)
    assert int(hole.sum()) == count and _digest(hole) == digest


# The release's random_irregular_mask (before its area rule) after np.random.seed(seed), drawn with
# cv2 4.10.0: (seed, pixels set, _digest).
RELEASE_MASKS = [(0, 4875, "3dcc462216f27bc7"), (1, 12097, "470508466d7a334b"),
                 (2, 4189, "e3091ef226045372"), (3, 356, "0db748ec9fa33767")]


@pytest.mark.parametrize("seed, count, digest", RELEASE_MASKS)
def test_release_masks_are_reproduced_from_the_releases_draws(seed, count, digest):
    """Feed the release's numpy draws (its order) through release_walk and draw_strokes."""
    rs, gen, strokes = np.random.RandomState(seed), MaskGenerator("freeform", image_size=256), []
    for i in range(rs.randint(1, 3)):
        row, col = rs.randint(256), rs.randint(256)
        n = rs.randint(16, 32)
        angles, lengths = rs.randint(0, 64, size=n).tolist(), rs.randint(10, 40, size=n).tolist()
        rs.randint(20, 21, size=n)  # its brush widths, all 20
        strokes.append(release_walk(row, col, angles, lengths, i))
    hole = gen.draw_strokes(strokes)
    assert int(hole.sum()) == count and _digest(hole) == digest


def test_freeform_distribution_matches_the_release():
    gen = MaskGenerator("freeform", image_size=256)
    assert gen.release_thickness == 20
    n_strokes, n_segments, steps, areas = [], [], [], []
    for i in range(120):
        strokes = gen.release_strokes(generator_for_index(0, i))
        n_strokes.append(len(strokes))
        for stroke in strokes:
            n_segments.append(len(stroke) - 1)
            steps += [math.dist(a, b) for a, b in zip(stroke[:-1], stroke[1:])]
        areas.append(1 - gen(generator_for_index(1, i)).mean().item())
    assert set(n_strokes) == {1, 2} and 0.35 < np.mean(np.array(n_strokes) == 2) < 0.65
    assert min(n_segments) >= 16 and max(n_segments) <= 31 and 21 < np.mean(n_segments) < 26
    # lengths randint(10, 40); truncating each coordinate moves an end by less than 1 px per axis
    assert 10 - 2 ** 0.5 <= min(steps) and max(steps) <= 39 + 2 ** 0.5 and 22 < np.mean(steps) < 27
    assert all(0.05 < a < 0.5 for a in areas)  # the release's strict rule
    assert 0.10 < np.mean(areas) < 0.17 and len(set(areas)) == len(areas)


@pytest.mark.parametrize("size, inner, outer", [(256, 9.5, 11.0), (32, 1.0, 2.0)])
def test_freeform_stroke_width(size, inner, outer):
    """An isolated segment covers every pixel within ``inner`` of it and none beyond ``outer``:
    cv2 thickness 20 at 256 px is a brush of radius 10 (21 px wide); 2 (3 px wide) at 32 px."""
    gen = MaskGenerator("freeform", image_size=size)
    rows, cols = np.mgrid[0:size, 0:size].astype(float)
    for i in range(3):
        stroke = gen.release_strokes(generator_for_index(2, i))[0]
        for a, b in list(zip(stroke[:-1], stroke[1:]))[:8]:
            hole = gen.draw_strokes([[a, b]])
            d = np.subtract(b, a, dtype=float)
            t = np.clip(((rows - a[0]) * d[0] + (cols - a[1]) * d[1]) / max(d @ d, 1e-12), 0, 1)
            dist = np.hypot(rows - a[0] - t * d[0], cols - a[1] - t * d[1])
            assert hole[dist <= inner].all() and not hole[dist > outer].any()


def test_freeform_demo_size_scales_the_release_geometry():
    """At 32 px: the same walk as at 256 px, vertices mapped to floor((v + 0.5) / 8), brush radius 1."""
    big, small = MaskGenerator("freeform", image_size=256), MaskGenerator("freeform", image_size=32)
    assert small.release_thickness == 2 and MaskGenerator("freeform", image_size=64).release_thickness == 4
    for i in range(5):
        walk256 = big.release_strokes(generator_for_index(3, i))
        walk32 = small.release_strokes(generator_for_index(3, i))
        assert walk32 == [[(r // 8, c // 8) for r, c in stroke] for stroke in walk256]
    areas = [1 - mask_for_index({"mask_type": "freeform", "image_size": 32}, 4, i).mean().item() for i in range(60)]
    assert all(0.05 < a < 0.5 for a in areas) and 0.10 < np.mean(areas) < 0.19


def test_freeform_masks_are_reproducible_and_per_image():
    cfg = {"mask_type": "freeform", "image_size": 256}
    gen = MaskGenerator.from_config(cfg)
    first = gen(torch.Generator().manual_seed(7))
    assert first.shape == (1, 256, 256) and first.dtype == torch.float32
    assert set(first.unique().tolist()) == {0.0, 1.0}  # 1 = observed, 0 = missing
    assert torch.equal(first, gen(torch.Generator().manual_seed(7)))
    # image 3's mask is the same whichever images were drawn before it
    alone = mask_for_index(cfg, 11, 3)
    for i in range(3):
        mask_for_index(cfg, 11, i)
    assert torch.equal(alone, mask_for_index(cfg, 11, 3))
    assert not torch.equal(alone, mask_for_index(cfg, 11, 4))


def test_free_form_is_refused_with_the_two_choices():
    for make in (lambda: MaskGenerator("free_form", image_size=256),
                 lambda: mask_for_index({"mask_type": "free_form", "image_size": 32}, 0, 0)):
        with pytest.raises(ValueError, match="'freeform'.*'palette_freeform'"):
            make()
    with pytest.raises(ValueError, match="thickness must be at least 2"):
        _cv_line(np.zeros((8, 8), dtype=bool), (1, 1), (5, 5), 1)

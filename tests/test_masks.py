"""Masks: DPS box / random / extreme layouts, Palette free-form area, per-index reproducibility."""
import pytest
import torch

from util.masks import MaskGenerator, derive_seed, generator_for_index, mask_for_index


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
def test_free_form_area_range(size):
    gen = MaskGenerator("free_form", image_size=size)
    areas = []
    for i in range(6):
        m = gen(generator_for_index(0, i))
        assert m.shape == (1, size, size) and set(m.unique().tolist()) <= {0.0, 1.0}
        areas.append(1 - m.mean().item())
    assert all(0.05 <= a <= 0.5 for a in areas)
    assert len(set(areas)) > 3


def test_mask_for_index_is_reproducible_whatever_the_order():
    cfg = {"mask_type": "free_form", "image_size": 64}
    forward = [mask_for_index(cfg, 5, i) for i in range(4)]
    backward = [mask_for_index(cfg, 5, i) for i in reversed(range(4))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
    assert not torch.equal(forward[0], forward[1])
    assert not torch.equal(forward[0], mask_for_index(cfg, 6, 0))
    assert derive_seed(5, 0, "mask") != derive_seed(5, 0, "noise")


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match="valid: box, random, extreme, free_form"):
        MaskGenerator("both")
    with pytest.raises(ValueError, match="needs mask_len_range"):
        MaskGenerator("box")
    with pytest.raises(ValueError, match="needs mask_prob_range"):
        MaskGenerator("random")
    with pytest.raises(TypeError, match="explicit torch.Generator"):
        MaskGenerator("random", mask_prob_range=(0.1, 0.2))(None)

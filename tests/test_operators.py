"""Operators: DPS fixtures, and shapes / gradients / batching / adjointness for every operator."""
import pytest
import torch

from guided_diffusion.measurements import OPERATORS, LinearOperator, get_operator
from conftest import DPS_OPERATORS

H = 8  # small images keep gradcheck fast


@pytest.fixture(scope="module")
def dps():
    return torch.load(DPS_OPERATORS / "dps_operators_io.pt", weights_only=True)


def _mask(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, size, size, generator=g) > 0.4).float()


# name, kwargs, output spatial size for H x H inputs
CASES = {
    "noise": ({}, H),
    "inpainting": ({}, H),
    "super_resolution_x2": ({"in_shape": (1, 3, H, H), "scale_factor": 2}, H // 2),
    "super_resolution_x4": ({"in_shape": (1, 3, H, H), "scale_factor": 4}, H // 4),
    "gaussian_blur": ({"kernel_size": 9, "intensity": 1.0}, H),
    "motion_blur": ({"kernel_size": 7, "intensity": 0.5, "seed": 3}, H),
    "phase_retrieval": ({"oversample": 4.0}, H + 2 * int(4.0 / 8 * H)),
}


def make(case, batch_mask=2):
    kwargs, _ = CASES[case]
    op = get_operator(case.split("_x")[0], device="cpu", **kwargs)
    if case == "inpainting":
        op.set_mask(_mask(batch_mask, H))
    return op


def test_every_registered_operator_is_covered():
    assert set(OPERATORS) == {c.split("_x")[0] for c in CASES}


def test_super_resolution_matches_dps_resizer(dps):
    op4 = get_operator("super_resolution", in_shape=(1, 3, 256, 256), scale_factor=4, device="cpu")
    torch.testing.assert_close(op4(dps["image_256"]), dps["sr4_down"], atol=1e-5, rtol=0)
    op2 = get_operator("super_resolution", in_shape=(1, 3, 64, 64), scale_factor=2, device="cpu")
    torch.testing.assert_close(op2(dps["image_64"]), dps["sr2_down"], atol=1e-5, rtol=0)


def test_super_resolution_x8_shape(dps):
    op = get_operator("super_resolution", in_shape=[1, 3, 256, 256], scale_factor=8)
    assert op(dps["image_256"]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="built for inputs of size"):
        op(torch.zeros(1, 3, 128, 128))


def test_gaussian_blur_matches_dps_blurkernel(dps):
    op = get_operator("gaussian_blur", kernel_size=61, intensity=3.0, device="cpu")
    torch.testing.assert_close(op.get_kernel()[0, 0].double(), dps["gaussian_kernel_61_sigma3"], atol=1e-7, rtol=0)
    torch.testing.assert_close(op(dps["image_256"]), dps["gaussian_blur_61_sigma3_reflect"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_output_shape(case):
    op = make(case)
    y = op(torch.randn(6, 3, H, H))
    out = CASES[case][1]
    assert y.shape == (6, 3, out, out)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_float64(case):
    op = make(case)
    x = torch.randn(2, 3, H, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t), (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("case", list(CASES))
def test_batch_equals_per_image(case):
    op = make(case, batch_mask=3)
    x = torch.randn(6, 3, H, H)
    y = op(x)
    for i in range(6):  # the mask of image i // 2 serves particles 2 (i // 2) .. 2 (i // 2) + 1
        single = op(x[i:i + 1], mask=op.mask[i // 2:i // 2 + 1]) if case == "inpainting" else op(x[i:i + 1])
        torch.testing.assert_close(y[i:i + 1], single, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c != "phase_retrieval"])
def test_transpose_is_adjoint(case):
    op = make(case)
    assert op.is_linear
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, H, H, generator=g, dtype=torch.float64)
    y = torch.randn(op(x).shape, generator=g, dtype=torch.float64)
    lhs, rhs = (op(x) * y).sum(), (x * op.transpose(y)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)
    assert op.transpose(y).shape == x.shape
    vjp = LinearOperator.transpose(op, y)  # the generic autograd adjoint agrees
    with torch.inference_mode():  # explicit adjoints need no autograd
        torch.testing.assert_close(op.transpose(y), vjp)


def test_blur_adjoint_with_wide_padding():
    op = get_operator("motion_blur", kernel_size=15, intensity=0.5, seed=1)
    x, y = torch.randn(2, 3, 9, 11, dtype=torch.float64), torch.randn(2, 3, 9, 11, dtype=torch.float64)
    torch.testing.assert_close((op(x) * y).sum(), (x * op.transpose(y)).sum(), atol=1e-10, rtol=1e-10)


def test_phase_retrieval_is_not_linear_and_keeps_energy():
    op = get_operator("phase_retrieval", oversample=2.0)
    assert not op.is_linear
    with pytest.raises(NotImplementedError, match="not linear"):
        op.transpose(torch.zeros(1, 3, 4, 4))
    x = torch.randn(2, 3, 256, 256, dtype=torch.float64)
    y = op(x)
    assert y.shape == (2, 3, 256 + 2 * 64, 256 + 2 * 64)  # DPS pads int(2 / 8 * 256) = 64 per side
    torch.testing.assert_close((y ** 2).sum(dim=(1, 2, 3)), (x ** 2).sum(dim=(1, 2, 3)))  # orthonormal FFT
    torch.testing.assert_close(op(-x), y)  # the magnitude ignores a global sign


def test_inpainting_mask_options():
    op = get_operator("inpainting", device="cpu")
    x = torch.randn(4, 3, H, H)
    with pytest.raises(RuntimeError, match="set_mask"):
        op(x)
    m = _mask(2, H)
    expected = x * m.repeat_interleave(2, 0)
    torch.testing.assert_close(op(x, mask=m), expected)  # DPS-style keyword
    torch.testing.assert_close(op.set_mask(m[:1, 0])(x), x * m[:1])  # [1, H, W] mask broadcasts
    with pytest.raises(ValueError, match="multiple"):
        op.set_mask(_mask(3, H))(x)


def test_motion_blur_kernel_is_reproducible_and_retrievable():
    a = get_operator("motion_blur", kernel_size=61, intensity=0.5, generator=torch.Generator().manual_seed(7))
    b = get_operator("motion_blur", kernel_size=61, intensity=0.5, seed=7)
    c = get_operator("motion_blur", kernel_size=61, intensity=0.5, seed=8)
    k = a.get_kernel()
    assert k.shape == (1, 1, 61, 61)
    assert torch.allclose(k.sum(), torch.tensor(1.0)) and (k >= 0).all()
    torch.testing.assert_close(k, b.get_kernel())
    assert not torch.allclose(k, c.get_kernel())
    assert (k > 0).sum() > 5  # a trajectory, not a single tap
    reused = get_operator("motion_blur", kernel_size=61, intensity=0.5, kernel=k)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(reused(x), a(x))


def test_bad_names_and_arguments_list_the_valid_ones():
    with pytest.raises(NameError, match="super_resolution"):
        get_operator("superres")
    with pytest.raises(TypeError, match="intensity"):
        get_operator("gaussian_blur", kernel_size=61, sigma=3.0)
    with pytest.raises(TypeError, match="missing required"):
        get_operator("super_resolution", scale_factor=4)
    with pytest.raises(ValueError, match="reflection padding"):
        get_operator("gaussian_blur", kernel_size=61, intensity=3.0)(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        get_operator("noise")(torch.zeros(3, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operators_on_gpu_match_cpu():
    for case in CASES:
        op = make(case)
        x = torch.randn(4, 3, H, H)
        torch.testing.assert_close(op.to("cuda")(x.cuda()).cpu(), make(case)(x), atol=1e-5, rtol=1e-5)

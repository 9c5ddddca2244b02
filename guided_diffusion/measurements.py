"""Measurement operators A of the DPS task suite, batched over particles and differentiable.

``get_operator(name, **kwargs)`` takes the DPS names and arguments, so a DPS / LD-SMC task
YAML works unchanged, e.g. ``get_operator("super_resolution", in_shape=(1, 3, 256, 256),
scale_factor=4, device="cpu")``. Every operator maps ``x [B, C, H, W] -> A(x)`` where B is
the flat images-times-particles batch (image-major, see docs/design.md section 2), keeps
its parameters as buffers, and is differentiable. Linear operators also give the true
adjoint ``transpose(y) = A^T y``. Noise models live in ``noise.py`` (re-exported here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import gaussian_kernel, motion_blur_kernel
from .noise import NOISES, Noise, get_noise, register_noise  # noqa: F401  (re-exported)
from .registry import build, register
from .resizer import resize_matrices

OPERATORS = {}


def register_operator(name: str):
    """Class decorator adding an operator to ``get_operator``'s registry under ``name``."""
    return register(OPERATORS, name)


def get_operator(name: str, **kwargs) -> Operator:
    """Build the operator registered as ``name`` (DPS names); unknown names/arguments raise."""
    return build(OPERATORS, "operator", name, kwargs)


def _check_image_batch(x: torch.Tensor, who: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{who} expects an image batch [B, C, H, W], got {shape}")


class Operator(nn.Module):
    """Base class of every operator: ``forward(x)`` is A(x); ``is_linear``; ``transpose``."""
    is_linear = False

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"operator '{self.name}' is not linear, so it has no transpose")


class NonLinearOperator(Operator):
    """Base class for nonlinear A: no adjoint."""


class LinearOperator(Operator):
    """Base class for linear A; ``transpose`` defaults to the vector-Jacobian product.

    For linear A, A^T y = d/dx <A x, y> (at any x, here x = 0), so the autograd VJP is the
    exact adjoint; the graph is kept when y needs grad, so A^T is differentiable too. (The
    operators below give explicit adjoints, which also work under ``torch.inference_mode``.)
    """
    is_linear = True

    def input_shape(self, y: torch.Tensor) -> tuple:
        """Shape of x with A(x) shaped like ``y``; shape-preserving by default."""
        return tuple(y.shape)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        _check_image_batch(y, f"{self.name}.transpose")
        with torch.enable_grad():
            x0 = torch.zeros(self.input_shape(y), dtype=y.dtype, device=y.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.forward(x0), x0, grad_outputs=y, create_graph=y.requires_grad)
        return g


@register_operator("noise")
class IdentityOperator(LinearOperator):
    """A(x) = x (denoising); A^T = I."""

    def __init__(self, device="cpu"):
        super().__init__()

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        _check_image_batch(x, "noise (identity) operator")
        return x

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        return y


@register_operator("inpainting")
class InpaintingOperator(LinearOperator):
    """A(x) = m * x with a per-image mask m (1 = observed, 0 = missing); A^T = A.

    The mask ``[Bm, 1 or C, H, W]`` (also ``[H, W]`` / ``[1, H, W]``) is set with
    ``set_mask`` or passed as ``forward(x, mask=...)`` (DPS style). For x with B = k * Bm
    rows the mask is expanded with ``repeat_interleave(k, 0)`` (image-major particles).
    """

    def __init__(self, device="cpu", mask=None):
        super().__init__()
        self.register_buffer("mask", None)
        self.device_ = torch.device(device)
        if mask is not None:
            self.set_mask(mask)

    @staticmethod
    def _as_4d(mask: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(mask) or mask.dim() not in (2, 3, 4):
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"inpainting mask must be [H, W], [1, H, W] or [B, 1 or C, H, W], got {shape}")
        if mask.dim() == 2:
            return mask[None, None]
        if mask.dim() == 3:
            if mask.shape[0] not in (1, 3):
                raise ValueError(f"a 3-D inpainting mask must be [1 or C, H, W], got {tuple(mask.shape)}")
            return mask[None]
        return mask

    def set_mask(self, mask: torch.Tensor) -> "InpaintingOperator":
        """Store the mask (moved to the operator's device, float32); returns self."""
        self.mask = self._as_4d(mask).to(device=self.device_, dtype=torch.float32)
        return self

    def expanded_mask(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """The mask broadcastable against x: ``[B or 1, 1 or C, H, W]``, in x's dtype."""
        m = self.mask if mask is None else self._as_4d(mask)
        if m is None:
            raise RuntimeError("inpainting operator has no mask: call op.set_mask(mask) or pass forward(x, mask=...)")
        if m.shape[-2:] != x.shape[-2:] or m.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"mask {tuple(m.shape)} does not fit images {tuple(x.shape)}: "
                             f"it must be [B, 1 or C, H, W] with the images' H and W")
        if m.shape[0] != 1 and m.shape[0] != x.shape[0]:
            if x.shape[0] % m.shape[0]:
                raise ValueError(f"batch {x.shape[0]} is not a whole multiple of the mask batch {m.shape[0]}")
            m = m.repeat_interleave(x.shape[0] // m.shape[0], dim=0)
        return m.to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor, mask=None, **kwargs) -> torch.Tensor:
        _check_image_batch(x, "inpainting operator")
        return x * self.expanded_mask(x, mask)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward(y)


@register_operator("super_resolution")
class SuperResolutionOperator(LinearOperator):
    """A(x) = R_h x R_w^T: DPS's antialiased bicubic ``Resizer(in_shape, 1/scale_factor)``.

    x [B, C, H, W] -> [B, C, ceil(H/s), ceil(W/s)], with (H, W) = in_shape[-2:]; the
    adjoint is A^T y = R_h^T y R_w (see ``resizer.py``).
    """

    def __init__(self, in_shape, scale_factor, device="cpu"):
        super().__init__()
        in_shape = tuple(int(v) for v in in_shape)
        if len(in_shape) < 2 or min(in_shape) < 1:
            raise ValueError(f"in_shape must end with (H, W), e.g. (1, 3, 256, 256), got {in_shape}")
        if not float(scale_factor) >= 1:
            raise ValueError(f"scale_factor is the downsampling factor (2, 4, 8, ...), got {scale_factor}")
        self.in_shape, self.scale_factor = in_shape, scale_factor
        R_h, R_w = resize_matrices(in_shape[-2], in_shape[-1], 1.0 / float(scale_factor), device=device)
        self.register_buffer("R_h", R_h)
        self.register_buffer("R_w", R_w)

    def _check(self, t: torch.Tensor, shape: tuple, what: str) -> None:
        _check_image_batch(t, f"super_resolution {what}")
        if tuple(t.shape[-2:]) != shape:
            raise ValueError(f"super_resolution built for {what} of size {shape} got {tuple(t.shape[-2:])}")

    def input_shape(self, y: torch.Tensor) -> tuple:
        return tuple(y.shape[:-2]) + self.in_shape[-2:]

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        self._check(x, self.in_shape[-2:], "inputs")
        return self.R_h.to(x.dtype) @ x @ self.R_w.to(x.dtype).T

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, (self.R_h.shape[0], self.R_w.shape[0]), "measurements")
        return self.R_h.to(y.dtype).T @ y @ self.R_w.to(y.dtype)


class BlurOperator(LinearOperator):
    """A(x) = k (*) x per channel after reflection padding of k // 2 (DPS ``Blurkernel``).

    Cross-correlation with the ``[k, k]`` kernel (``conv2d``, groups = C); shape-preserving.
    """

    def __init__(self, kernel: torch.Tensor, device="cpu"):
        super().__init__()
        self.kernel_size = kernel.shape[-1]
        self.register_buffer("kernel", kernel.to(device=device, dtype=torch.float32))

    def get_kernel(self) -> torch.Tensor:
        """The kernel as DPS returns it: ``[1, 1, k, k]``."""
        return self.kernel.view(1, 1, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        _check_image_batch(x, f"{self.name} operator")
        pad = self.kernel_size // 2
        if min(x.shape[-2:]) <= pad:
            raise ValueError(f"{self.name}: reflection padding of {pad} needs images larger than {pad} px, "
                             f"got {tuple(x.shape[-2:])}; use a smaller kernel_size")
        C = x.shape[1]
        w = self.kernel.to(x.dtype).expand(C, 1, -1, -1)
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), w, groups=C)

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y = P^T (k (*)^T y): transposed convolution, then the reflection padding's
        adjoint (each padded pixel's value is added back onto the pixel it mirrors)."""
        _check_image_batch(y, f"{self.name}.transpose")
        pad, C = self.kernel_size // 2, y.shape[1]
        z = F.conv_transpose2d(y, self.kernel.to(y.dtype).expand(C, 1, -1, -1), groups=C)
        return _reflect_pad_adjoint(_reflect_pad_adjoint(z, pad, -2), pad, -1)


def _reflect_pad_adjoint(z: torch.Tensor, p: int, dim: int) -> torch.Tensor:
    """Adjoint of ``F.pad(x, ..., mode="reflect")`` by p along ``dim``: padded index i < p
    copies x[p - i] and padded index p + n + j copies x[n - 2 - j], so those entries of z
    are added to x's entries 1..p and n-1-p..n-2."""
    if p == 0:
        return z
    n = z.shape[dim] - 2 * p
    left, centre, right = z.narrow(dim, 0, p), z.narrow(dim, p, n), z.narrow(dim, p + n, p)
    zeros = lambda k: z.new_zeros(z.shape[:dim % z.dim()] + (k,) + z.shape[dim % z.dim() + 1:])  # noqa: E731
    from_left = torch.cat([zeros(1), left.flip(dim), zeros(n - 1 - p)], dim=dim)
    from_right = torch.cat([zeros(n - 1 - p), right.flip(dim), zeros(1)], dim=dim)
    return centre + from_left + from_right


@register_operator("gaussian_blur")
class GaussianBlurOperator(BlurOperator):
    """Gaussian blur: DPS kernel of size ``kernel_size`` and std ``intensity`` (61, 3.0 in the paper)."""

    def __init__(self, kernel_size, intensity, device="cpu"):
        super().__init__(gaussian_kernel(int(kernel_size), float(intensity)), device)
        self.intensity = float(intensity)


@register_operator("motion_blur")
class MotionBlurOperator(BlurOperator):
    """Motion blur with a random-trajectory kernel drawn once, at construction.

    The kernel comes from ``generator`` (a ``torch.Generator``) or, failing that, ``seed``
    (default 0); the same kernel serves measuring and guidance and ``get_kernel()`` gives it
    back for saving. Pass ``kernel=`` to reuse a saved one.
    """

    def __init__(self, kernel_size, intensity, device="cpu", generator=None, seed=None, kernel=None):
        if kernel is None:
            if generator is None:
                generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
            kernel = motion_blur_kernel(int(kernel_size), float(intensity), generator)
        else:
            kernel = torch.as_tensor(kernel).reshape(int(kernel_size), int(kernel_size))
        super().__init__(kernel, device)
        self.intensity = float(intensity)


@register_operator("phase_retrieval")
class PhaseRetrievalOperator(NonLinearOperator):
    """A(x) = |F(pad(x))|: magnitude of the orthonormal centred 2-D FFT of the padded image.

    DPS pads every side with int(oversample / 8 * 256) zeros; we use the image's own size
    for 256 (int(oversample / 8 * H) rows, int(oversample / 8 * W) columns), which is the
    same at 256 px. x [B, C, H, W] -> [B, C, H + 2 p_h, W + 2 p_w]. Differentiable where
    the spectrum is nonzero.
    """

    def __init__(self, oversample, device="cpu"):
        super().__init__()
        if float(oversample) < 0:
            raise ValueError(f"oversample must be >= 0, got {oversample}")
        self.oversample = float(oversample)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        _check_image_batch(x, "phase_retrieval operator")
        p_h, p_w = (int(self.oversample / 8.0 * n) for n in x.shape[-2:])
        padded = F.pad(x, (p_w, p_w, p_h, p_h))
        spectrum = torch.fft.fftshift(
            torch.fft.fft2(torch.fft.ifftshift(padded, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
        return spectrum.abs()

"""MATLAB-style antialiased bicubic resizing as a pair of dense matrices.

This is the resampling of DPS's ``util/resizer.py`` (``Resizer(in_shape, 1/s)``, after
Shocher's MATLAB ``imresize`` port) written as a separable linear map: for each spatial
axis of length n a matrix ``R`` of shape ``[m, n]`` with ``m = ceil(n * scale)``, so that

    resize(x) = R_h @ x @ R_w^T        x [B, C, H, W] -> [B, C, m_h, m_w].

Row i of ``R`` holds the normalised cubic weights of output pixel i. With antialiasing
(downscaling) the kernel is stretched by 1/scale: k_s(d) = scale * cubic(scale * d).
Taps that fall outside the image are folded back by half-sample symmetric reflection
(index j -> j mod 2n, then 2n - 1 - j when j >= n), exactly as the reference indexes a
mirrored copy of the axis. Because the map is an explicit matrix its adjoint is
``R_h^T @ y @ R_w``.
"""
import math

import numpy as np
import torch


def cubic(d: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``), support |d| < 2."""
    a = np.abs(d)
    a2, a3 = a ** 2, a ** 3
    inner = (1.5 * a3 - 2.5 * a2 + 1.0) * (a <= 1)
    outer = (-0.5 * a3 + 2.5 * a2 - 4.0 * a + 2.0) * ((a > 1) & (a <= 2))
    return inner + outer


def resize_matrix(in_length: int, scale: float, antialiasing: bool = True) -> np.ndarray:
    """The ``[ceil(in_length * scale), in_length]`` float64 bicubic resampling matrix.

    Output pixel i (1-based) sits at input coordinate
    u_i = (i - (m - n * scale) / 2) / scale + (1 - 1/scale) / 2   (1-based, pixel centres),
    and takes taps at the ceil(width) + 2 integer positions starting at floor(u_i - width/2).
    """
    if in_length < 1 or scale <= 0:
        raise ValueError(f"resize_matrix needs in_length >= 1 and scale > 0, got {in_length}, {scale}")
    out_length = int(math.ceil(in_length * scale))
    width = 4.0
    if antialiasing and scale < 1:
        kernel = lambda d: scale * cubic(scale * d)  # noqa: E731  (stretched low-pass kernel)
        width = width / scale
    else:
        kernel = cubic
    i = np.arange(1, out_length + 1, dtype=np.float64)
    u = (i - (out_length - in_length * scale) / 2) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = left[:, None] + np.arange(math.ceil(width) + 2)[None, :] - 1  # 0-based input index
    w = kernel(u[:, None] - taps - 1)
    row_sum = w.sum(axis=1, keepdims=True)
    row_sum[row_sum == 0] = 1.0
    w = w / row_sum
    # Half-sample symmetric boundary: fold every tap back into [0, n).
    j = np.mod(taps.astype(np.int64), 2 * in_length)
    j = np.where(j >= in_length, 2 * in_length - 1 - j, j)
    R = np.zeros((out_length, in_length), dtype=np.float64)
    np.add.at(R, (np.repeat(np.arange(out_length), taps.shape[1]), j.ravel()), w.ravel())
    return R


def resize_matrices(height: int, width: int, scale: float, dtype=torch.float32, device="cpu"):
    """``(R_h [m_h, H], R_w [m_w, W])`` as tensors for ``resize(x) = R_h @ x @ R_w^T``."""
    R_h = torch.as_tensor(resize_matrix(height, scale), dtype=dtype, device=device)
    R_w = torch.as_tensor(resize_matrix(width, scale), dtype=dtype, device=device)
    return R_h, R_w

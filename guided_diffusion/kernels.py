"""Blur kernels of the DPS tasks: the truncated Gaussian and the random-trajectory motion kernel."""
import math

import torch


def gaussian_kernel(kernel_size: int, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The ``[k, k]`` float64 Gaussian kernel DPS builds by filtering a centred delta.

    DPS calls ``scipy.ndimage.gaussian_filter(delta, sigma)``, a separable filter whose 1-D
    taps are g(d) = exp(-d^2 / (2 sigma^2)) / sum, for |d| <= r = int(truncate * sigma + 0.5),
    so the kernel is the outer product g g^T placed at the centre of a k x k array and zero
    beyond radius r. We require r <= k // 2 (61 px and sigma 3 give r = 12), where this
    equals the filtered delta exactly.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"the Gaussian blur intensity (sigma) must be > 0, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    half = kernel_size // 2
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * d ** 2 / float(sigma) ** 2)
    g = g / g.sum()
    if radius > half:
        raise ValueError(f"sigma {sigma} needs kernel_size >= {2 * radius + 1} (the Gaussian is cut at "
                         f"{truncate} sigma), got {kernel_size}")
    g1 = torch.zeros(kernel_size, dtype=torch.float64)
    g1[half - radius: half + radius + 1] = g
    return torch.outer(g1, g1)


def _uniform(generator, n=1, low=0.0, high=1.0) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    return low + (high - low) * u


def _beta_1_b(generator, b: float, n: int) -> torch.Tensor:
    """Beta(1, b) by inversion: F(x) = 1 - (1 - x)^b."""
    return 1.0 - (1.0 - _uniform(generator, n)) ** (1.0 / b)


def _beta_2_20(generator) -> float:
    """Beta(2, 20) as the 2nd smallest of 21 uniforms (order statistic)."""
    return float(torch.sort(_uniform(generator, 21)).values[1])


def _triangular(generator, n: int, mode: float, high: float) -> torch.Tensor:
    """Triangular(0, mode, high) by inversion of its CDF."""
    if high <= 0:
        return torch.zeros(n, dtype=torch.float64)
    u = _uniform(generator, n)
    c = mode / high
    lower = torch.sqrt(u * high * mode)
    upper = high - torch.sqrt((1 - u) * high * (high - mode))
    return torch.where(u < c, lower, upper)


def motion_blur_kernel(kernel_size: int, intensity: float, generator: torch.Generator) -> torch.Tensor:
    """A random camera-shake kernel ``[k, k]`` (float64, sums to 1), drawn from ``generator``.

    The trajectory follows the recipe of the ``motionblur`` package that DPS uses (same
    distributions, own code): with diagonal D = sqrt(2) k and intensity s in [0, 1),
      path length  L = 0.75 D (U(0,1) + U(0, s^2)),
      step lengths l_i = Beta(1, 30) (1 - s + 1e-6) D, drawn until their sum reaches L,
      directions   a_0 ~ U(-A, A) with A ~ U(0, s pi); a_i ~ Triangular(0, s A, A) whose
                   sign flips w.p. J ~ Beta(2, 20) and otherwise follows a_{i-1},
      positions    p = cumsum(l_i e^{i a_i}), centred on their mean, rotated by U(0, pi),
                   moved to the kernel centre.
    The polyline is rasterised by bilinear splatting of points 0.25 px apart, clipped to
    the k x k support, and normalised to sum 1.
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size}")
    if not 0.0 <= intensity < 1.0:
        raise ValueError(f"motion blur intensity must be in [0, 1), got {intensity}")
    D = math.sqrt(2.0) * kernel_size
    L = 0.75 * D * float(_uniform(generator) + _uniform(generator, 1, 0.0, intensity ** 2))
    # Step lengths, drawn in chunks until the path is long enough (rejecting single steps > L).
    steps, total = [], 0.0
    while total < L:
        chunk = _beta_1_b(generator, 30.0, 64) * (1.0 - intensity + 1e-6) * D
        for s in chunk[chunk < L].tolist():
            steps.append(s)
            total += s
            if total >= L:
                break
    steps = torch.tensor(steps, dtype=torch.float64)
    n = steps.numel()
    A = float(_uniform(generator, 1, 0.0, intensity * math.pi))
    J = _beta_2_20(generator)
    mags = _triangular(generator, n, intensity * A, A)
    flips = _uniform(generator, n) < J
    angles = torch.empty(n, dtype=torch.float64)
    angles[0] = float(_uniform(generator, 1, -A, A))
    for i in range(1, n):
        sign = 1.0 if angles[i - 1] >= 0 else -1.0
        angles[i] = mags[i] * (-sign if flips[i] else sign)
    path = torch.cumsum(torch.polar(steps, angles), 0)
    path = path - path.mean()
    path = path * torch.exp(1j * _uniform(generator, 1, 0.0, math.pi).to(torch.complex128))
    path = path + complex((kernel_size - 1) / 2, (kernel_size - 1) / 2)
    return _rasterise(path, kernel_size)


def _rasterise(path: torch.Tensor, size: int, spacing: float = 0.25) -> torch.Tensor:
    """Bilinear splat of a complex polyline (x = real, y = imag, pixel centres at integers)."""
    pts = [path[:1]]
    for a, b in zip(path[:-1], path[1:]):
        m = max(1, int(math.ceil(abs(complex(b - a)) / spacing)))
        t = torch.arange(1, m + 1, dtype=torch.float64) / m
        pts.append(a + (b - a) * t)
    p = torch.cat(pts)
    x, y = p.real, p.imag
    x0, y0 = torch.floor(x), torch.floor(y)
    kernel = torch.zeros(size * size, dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            w = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            kernel.index_add_(0, (yi[ok] * size + xi[ok]).long(), w[ok])
    kernel = kernel.view(size, size)
    return kernel / kernel.sum()

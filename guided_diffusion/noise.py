"""Measurement noise models of DPS: sample y given A(x), and the log-likelihood log p(y | A(x)).

``get_noise(name, **kwargs)``: ``clean``, ``gaussian`` (``sigma``), ``poisson`` (``rate``).
``noise(Ax, generator=g)`` draws y (g: one ``torch.Generator`` or a list with one per row of
Ax, so that image i gets the same noise whatever the batch); ``noise.log_likelihood(y, Ax)``
returns ``[B]``, the full log-density (constants included) summed over all non-batch dims.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch
from torch import nn

from .registry import build, register

NOISES = {}
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def register_noise(name: str):
    """Class decorator adding a noise model to ``get_noise``'s registry under ``name``."""
    return register(NOISES, name)


def get_noise(name: str, **kwargs) -> "Noise":
    """Build the noise model registered as ``name`` (DPS names); unknown names/arguments raise."""
    return build(NOISES, "noise", name, kwargs)


def _per_row(draw: Callable, batch: int, generator: Generators) -> torch.Tensor:
    """``draw(rows, g)`` for the whole batch with one generator, or row by row with a list.

    ``rows`` is ``slice(None)`` (all rows) or ``slice(i, i + 1)`` for row i.
    """
    if generator is None:
        raise ValueError("pass an explicit torch.Generator (or a list, one per image) as generator=")
    if isinstance(generator, torch.Generator):
        return draw(slice(None), generator)
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}: pass one per row")
    return torch.cat([draw(slice(i, i + 1), g) for i, g in enumerate(generator)])


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


class Noise(nn.Module):
    """Base class: ``forward(Ax, generator)`` samples y; ``log_likelihood(y, Ax)`` -> [B]."""

    def log_likelihood(self, y: torch.Tensor, Ax: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _check(y: torch.Tensor, Ax: torch.Tensor) -> torch.Tensor:
        """Expand a per-image y to a particle batch Ax (B = k * B_y rows, image-major)."""
        if y.shape[1:] != Ax.shape[1:]:
            raise ValueError(f"y {tuple(y.shape)} and A(x) {tuple(Ax.shape)} differ beyond the batch dim")
        if y.shape[0] != Ax.shape[0]:
            if Ax.shape[0] % y.shape[0]:
                raise ValueError(f"A(x) batch {Ax.shape[0]} is not a multiple of the y batch {y.shape[0]}")
            y = y.repeat_interleave(Ax.shape[0] // y.shape[0], dim=0)
        return y


@register_noise("clean")
class Clean(Noise):
    """y = A(x). The density is a point mass: log p = 0 where y == A(x), -inf elsewhere."""

    def __init__(self, device="cpu"):
        super().__init__()

    def forward(self, Ax: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return Ax

    def log_likelihood(self, y: torch.Tensor, Ax: torch.Tensor) -> torch.Tensor:
        y = self._check(y, Ax)
        equal = (y == Ax).reshape(y.shape[0], -1).all(dim=1)
        return torch.where(equal, 0.0, float("-inf")).to(Ax.dtype)


@register_noise("gaussian")
class GaussianNoise(Noise):
    """y = A(x) + sigma * eps, eps ~ N(0, I).

    log p(y | A x) = -||y - A x||^2 / (2 sigma^2) - (n / 2) log(2 pi sigma^2), n = C H W.
    """

    def __init__(self, sigma, device="cpu"):
        super().__init__()
        if not float(sigma) > 0:
            raise ValueError(f"gaussian noise needs sigma > 0 (use name 'clean' for no noise), got {sigma}")
        self.sigma = float(sigma)

    def forward(self, Ax: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        def draw(rows, g):
            eps = torch.randn(Ax[rows].shape, generator=g, dtype=Ax.dtype, device=g.device)
            return eps.to(Ax.device)

        return Ax + self.sigma * _per_row(draw, Ax.shape[0], generator)

    def log_likelihood(self, y: torch.Tensor, Ax: torch.Tensor) -> torch.Tensor:
        y = self._check(y, Ax)
        n = Ax[0].numel()
        sq = _flat_sum((y - Ax) ** 2)
        return -0.5 * sq / self.sigma ** 2 - 0.5 * n * math.log(2 * math.pi * self.sigma ** 2)


@register_noise("poisson")
class PoissonNoise(Noise):
    """DPS Poisson noise on [-1, 1] images, with c = 255 * rate photons at full intensity.

    Sampling (as DPS): lambda = c * clip((A x + 1) / 2, 0, 1), K ~ Poisson(lambda),
    y = clip(2 K / c - 1, -1, 1).
    Likelihood: with k = round((y + 1) c / 2) the count y encodes,
      log p = k log lambda - lambda - log k!                      for y < 1,
      log p = log P(K >= ceil(c)) = log P_reg(ceil(c), lambda)    for y = 1 (clipped from above),
    summed over pixels (lambda = 0 gives 0 for k = 0 and -inf otherwise).
    """

    def __init__(self, rate, device="cpu"):
        super().__init__()
        if not float(rate) > 0:
            raise ValueError(f"poisson noise needs rate > 0, got {rate}")
        self.rate = float(rate)
        self.count_scale = 255.0 * self.rate

    def intensity(self, Ax: torch.Tensor) -> torch.Tensor:
        """lambda = c * clip((A x + 1) / 2, 0, 1)."""
        return self.count_scale * ((Ax + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, Ax: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        lam = self.intensity(Ax.detach())

        def draw(rows, g):
            return torch.poisson(lam[rows].to(g.device), generator=g).to(Ax.device)

        k = _per_row(draw, lam.shape[0], generator)
        return (2.0 * k / self.count_scale - 1.0).clamp(-1.0, 1.0)

    def log_likelihood(self, y: torch.Tensor, Ax: torch.Tensor) -> torch.Tensor:
        y = self._check(y, Ax)
        lam = self.intensity(Ax)
        k = torch.round((y + 1.0) * self.count_scale / 2.0)
        log_pmf = torch.special.xlogy(k, lam) - lam - torch.lgamma(k + 1.0)
        k_top = torch.ceil(torch.tensor(self.count_scale, dtype=Ax.dtype, device=Ax.device))
        top = y >= 1.0
        # Evaluate each branch only where it is used, so no NaN gradient leaks through where().
        log_tail = torch.log(torch.special.gammainc(k_top, torch.where(top, lam, k_top)))
        return _flat_sum(torch.where(top, log_tail, log_pmf))

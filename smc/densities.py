"""The log-densities of spec sections 3-4, the gradient clipping of the proposal, and the
check that stops a run whose weights or particles stopped being finite numbers."""
from __future__ import annotations

import math
from typing import Optional

import torch


class Densities:
    """Gaussian log-densities batched over flat particles, as the preset asks.

    log_density "mean": mean over dims of -(x-m)^2 / (2 var) (reference); "sum": the full
    Gaussian log-density, summed over dims (exact). Shapes: x, m [M, ...] -> [M].
    Levels are given by their abar index (`Chain.a`).
    """

    def __init__(self, cfg, abar: torch.Tensor):
        self.cfg, self.abar = cfg, abar

    def gauss(self, x: torch.Tensor, m: torch.Tensor, var) -> torch.Tensor:
        r2 = (x - m).pow(2).flatten(1)
        var = torch.as_tensor(var, dtype=r2.dtype, device=r2.device)
        if self.cfg.log_density == "mean":
            return -0.5 * r2.mean(1) / var
        return -0.5 * r2.sum(1) / var - 0.5 * r2.shape[1] * torch.log(2 * math.pi * var)

    def aux_var(self, a: int):
        """Variance of l(y_t | z_t) at abar index a: 1 - abar_t; at t = 0 sigma_y^2 (exact) or 1 - abar_0."""
        if a == 0 and self.cfg.final_std_sigma_y:
            return self.cfg.sigma_y ** 2
        return 1 - self.abar[a]

    def twist_var(self, a: int):
        """Variance of lbar(y0 | z_t) at abar index a: 1 - abar_t (+ sigma_y^2 in the exact preset)."""
        return 1 - self.abar[a] + (self.cfg.sigma_y ** 2 if self.cfg.twist_var_sigma_y else 0.0)


def unit_clip(g: torch.Tensor):
    """(g / max(||g||, 1), ||g||) per particle (row): [M, ...] -> ([M, ...], [M])."""
    norm = g.flatten(1).norm(dim=1)
    return g / norm.clamp_min(1.0).view(-1, *([1] * (g.dim() - 1))), norm


class NonFiniteWeightsError(RuntimeError):
    """LD-SMC met a NaN or infinite log-weight or particle.

    image: the row of the batch; step: the transition index (None: at the start, before the
    first transition); t: the UNet timestep of the level where it appeared.
    """

    def __init__(self, image: int, step: Optional[int], t: int, what: str):
        self.image, self.step, self.t = image, step, t
        where = "at the start" if step is None else f"in transition {step}"
        super().__init__(
            f"LD-SMC: non-finite {what} for image row {image} {where} (timestep t = {t}). Likely "
            f"causes: a corrupted checkpoint whose UNet or decoder returns NaN/inf, non-finite "
            f"sampler settings, or an operator that produces NaN/inf.")


def check_finite(log_w: torch.Tensor, z: torch.Tensor, step: Optional[int], t: int) -> None:
    """Raise NonFiniteWeightsError for the first image whose log-weights [B, N] or particles
    [B*N, ...] are not all finite (one reduction and one sync per call)."""
    B = log_w.shape[0]
    w_ok = torch.isfinite(log_w).all(1)
    z_ok = torch.isfinite(z.reshape(B, -1)).all(1)
    ok = w_ok & z_ok
    if bool(ok.all()):
        return
    b = int((~ok).nonzero()[0, 0])
    what = " and ".join(n for n, good in (("log-weights", w_ok[b]), ("particles", z_ok[b])) if not bool(good))
    raise NonFiniteWeightsError(b, step, t, what)

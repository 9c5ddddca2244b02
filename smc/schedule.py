"""Timestep lists and DDIM (eta = 1) transition coefficients (spec section 1).

Pure functions: the sampler gets its schedule as tensors, not hidden state.
"""
from __future__ import annotations

import torch


def strided_timesteps(num_steps: int, num_train_steps: int = 1000) -> torch.Tensor:
    """Decreasing list of `num_steps` model timesteps from T-1 to 0 (both included).

    num_steps = num_train_steps gives the full chain [999, 998, ..., 0]. Returns a
    LongTensor [num_steps]; the chain makes num_steps - 1 transitions.
    """
    if not 2 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [2, {num_train_steps}], got {num_steps}")
    ts = torch.linspace(num_train_steps - 1, 0, num_steps, dtype=torch.float64).round().long()
    assert bool((ts[:-1] > ts[1:]).all()), "timesteps must strictly decrease"
    return ts


def ddim_eta1_coeffs(abar_t: torch.Tensor, abar_next: torch.Tensor):
    """Coefficients of the DDIM (eta = 1) step t -> t' (t' < t).

    sigma = sqrt((1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t')),
    c_eps = sqrt(1 - abar_t' - sigma^2), so that
    mu_theta(z_t) = sqrt(abar_t') zbar0 + c_eps eps_theta(z_t, t).
    Scalars (0-dim tensors) in, (sigma, c_eps) out.
    """
    sigma2 = (1 - abar_next) / (1 - abar_t) * (1 - abar_t / abar_next)
    c_eps = (1 - abar_next - sigma2).clamp_min(0).sqrt()
    return sigma2.sqrt(), c_eps


def tweedie_zbar0(z_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """zbar0(z_t) = (z_t - sqrt(1 - abar_t) eps_theta(z_t, t)) / sqrt(abar_t)."""
    return (z_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()

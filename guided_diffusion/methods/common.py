"""Pieces shared by the baseline samplers: the chain, the DDIM/DDPM step, guidance gradients.

Every baseline is a loop over transitions t -> t' of a decreasing timestep list (the same
`smc.schedule.strided_timesteps` as LD-SMC: t_0 = T-1 > ... > t_K = 0, K = num_steps - 1
transitions) or, for LatentDAPS, over noise levels. `Chain` holds what such a loop needs:
the model, the measurements, one torch.Generator per image (`per_image_generators`), the
schedule, and the callback; the method file keeps only its algorithm box.

Shapes: B images, latents [B, *latent_shape] (any rank: the closed-form model has vector
latents), measurements y [B, ...]. Per-image scalars are [B].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ldm.interface import model_device
from smc.resampling import per_image_generators, randn_per_image
from smc.schedule import ddim_eta1_coeffs, strided_timesteps, tweedie_zbar0


@dataclass
class MethodState:
    """What `callback` sees after each transition t -> t_next."""
    step: int                          # transition index i (0 .. K-1)
    t: int                             # model timestep of the level left (for LatentDAPS: nearest to sigma)
    t_next: int                        # model timestep of the level reached
    zbar0: torch.Tensor                # [B, *latent] the method's estimate of z_0 at level t
    z: torch.Tensor                    # [B, *latent] the new latent (level t_next)
    residual: Optional[torch.Tensor]   # [B] ||y - A(D(zbar0))|| where the method computed it, else None


@dataclass
class MethodResult:
    """Output of a baseline sampler (the fields every method of the registry has, plus traces)."""
    x0: torch.Tensor                       # [B, C, H, W] the method's reconstruction D(z_0)
    x0_refined: Optional[torch.Tensor]     # None: the baselines have no separate refinement output
    z0: torch.Tensor                       # [B, *latent]
    residual: torch.Tensor                 # [B, K] ||y - A(D(zbar0))|| at each transition (NaN where not computed)
    timesteps: torch.Tensor                # [K+1] model timesteps of the chain
    method: str
    config: object                         # the resolved config that ran


def require(ok: bool, message: str) -> None:
    """Config validation: raise ValueError(message) unless ok."""
    if not ok:
        raise ValueError(message)


def check_chain_settings(num_steps, eta) -> None:
    require(isinstance(num_steps, int) and 2 <= num_steps <= 1000,
            f"num_steps must be an int in [2, 1000] (timesteps 999 -> 0), got {num_steps!r}")
    require(0.0 <= eta <= 1.0, f"eta must lie in [0, 1] (0: DDIM, 1: DDPM ancestral step), got {eta!r}")


def chain_callbacks(cfg, num_train_steps: int) -> int:
    """Transitions of a chain over `cfg.num_steps` timesteps: one callback each."""
    return min(cfg.num_steps, num_train_steps) - 1


def per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image scalar [B] shaped to broadcast against `like` [B, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def residual_norm(operator: Callable, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||y_b - A(x_b)|| per image (the unsquared norm of DPS's code): [B]."""
    return (y - operator(x)).flatten(1).norm(dim=1)


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_b - b_b|| per image: [B]."""
    return (a - b).flatten(1).norm(dim=1)


def gradient(loss: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """grad_z of a per-image loss [B]: row b is d loss_b / d z_b (images do not interact)."""
    g, = torch.autograd.grad(loss.sum(), z)
    return g


def ddim_coeffs(abar_t: torch.Tensor, abar_next: torch.Tensor, eta: float):
    """(sigma, c_eps) of the DDIM step t -> t' with stochasticity eta.

    sigma = eta sqrt((1 - abar_t') / (1 - abar_t) (1 - abar_t / abar_t')), c_eps = sqrt(1 - abar_t' - sigma^2);
    eta = 1 is the DDPM posterior (ancestral step), eta = 0 deterministic DDIM.
    """
    sigma1, _ = ddim_eta1_coeffs(abar_t, abar_next)
    sigma = eta * sigma1
    return sigma, (1 - abar_next - sigma ** 2).clamp_min(0).sqrt()


class Chain:
    """State and helpers of one run: model, y, per-image generators, schedule, traces, callback."""

    def __init__(self, model, y: torch.Tensor, generator=None, cond=None, callback=None,
                 num_steps: Optional[int] = None):
        self.model = model
        self.device = model_device(model)
        self.abar = model.alphas_cumprod.to(self.device)
        if y.dim() < 2:
            raise ValueError(f"y must be a batch [B, ...] of measurements, got shape {tuple(y.shape)}")
        self.y = y.to(device=self.device, dtype=self.abar.dtype).detach()
        self.B = self.y.shape[0]
        if cond is not None and cond.shape[0] != self.B:
            raise ValueError(f"cond has {cond.shape[0]} rows for {self.B} measurements: pass one per image")
        self.cond = cond
        self.gens = per_image_generators(generator, self.B, self.device)
        self.latent_shape = tuple(model.latent_shape)
        self.callback = callback
        self.ts = (strided_timesteps(num_steps, self.abar.numel()).to(self.device)
                   if num_steps is not None else None)
        self.residuals = []

    @property
    def transitions(self):
        """(i, t, t') for each transition of the timestep list."""
        ts = self.ts.tolist()
        return [(i, ts[i], ts[i + 1]) for i in range(len(ts) - 1)]

    def noise(self) -> torch.Tensor:
        """One standard normal latent per image, each from its own generator: [B, *latent]."""
        return randn_per_image(self.gens, self.latent_shape, self.device, self.abar.dtype)

    def denoise(self, z_t: torch.Tensor, t: int):
        """eps_theta(z_t, t) and the Tweedie estimate zbar0(z_t) (differentiable in z_t)."""
        t_vec = torch.full((z_t.shape[0],), t, device=self.device, dtype=torch.long)
        eps = self.model.eps(z_t, t_vec, self.cond)
        return eps, tweedie_zbar0(z_t, eps, self.abar[t])

    def ddim_step(self, eps: torch.Tensor, zbar0: torch.Tensor, t: int, t_next: int, eta: float):
        """z_t' = sqrt(abar_t') zbar0 + c_eps eps + sigma noise (DDIM with eta; eta = 1 is DDPM)."""
        sigma, c_eps = ddim_coeffs(self.abar[t], self.abar[t_next], eta)
        z = self.abar[t_next].sqrt() * zbar0 + c_eps * eps
        if eta > 0:
            z = z + sigma * self.noise()
        return z

    def report(self, step: int, t: int, t_next: int, zbar0, z, residual=None) -> None:
        """Record the step's residual and call the callback (once per transition)."""
        self.residuals.append(residual.detach() if residual is not None
                              else torch.full((self.B,), float("nan"), device=self.device))
        if self.callback is not None:
            self.callback(MethodState(step, t, t_next, zbar0.detach(), z.detach(),
                                      None if residual is None else residual.detach()))

    def finish(self, z0: torch.Tensor, name: str, cfg, timesteps: Optional[torch.Tensor] = None) -> MethodResult:
        """Decode z_0 and pack the result."""
        with torch.no_grad():
            x0 = self.model.decode(z0.detach())
        ts = self.ts if timesteps is None else timesteps
        return MethodResult(x0=x0, x0_refined=None, z0=z0.detach(), residual=torch.stack(self.residuals, 1),
                            timesteps=ts.cpu(), method=name, config=cfg)

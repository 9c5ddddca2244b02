"""ReSample: latent DPS with hard data consistency and stochastic resampling.

Paper: Song, Kwon, Zhang, Hu, Qu, Shen, *Solving Inverse Problems with Latent Diffusion Models via
Hard Data Consistency*, ICLR 2024 (Algorithm 1; a baseline of the LD-SMC paper).
Code followed: github.com/soominkwon/resample (ldm/models/diffusion/ddim.py: `resample_sampling`,
`pixel_optimization`, `latent_optimization`, `stochastic_resample`; sample_condition.py for the
DDIM settings; ldm_inverse/condition_methods.py for the latent DPS step). Defaults:
configs/methods/resample.yaml.

Algorithm (K transitions t_i -> t_{i+1}; the code's counter index = K - 1 - i runs K-1 .. 0):
    z_T ~ N(0, I)
    for each transition t -> t':
        eps, zbar0 = eps_theta(z_t, t), Tweedie(z_t)
        z' = DDIM(z_t; eta) - zeta abar_t grad_{z_t} ||y - A(D(zbar0))||          (latent DPS step)
        if 0 < index <= K - K//3 and index % skip == 0:                         (hard data consistency)
            zhat0 = Tweedie estimate after `look_ahead` - 1 further unconditional DDIM steps from z'
            if index >= K//3:   zhat0 = E(argmin_x ||y - A(x)||^2 from D(zhat0))     (pixel stage, AdamW)
            else:               zhat0 = argmin_z ||y - A(D(z))||^2 from zhat0          (latent stage, AdamW)
            z' ~ N((s2 sqrt(abar_t') zhat0 + (1 - abar_t') z') / (s2 + 1 - abar_t'),
                   s2 (1 - abar_t') / (s2 + 1 - abar_t') I),                          (stochastic resampling)
                 s2 = gamma (1 - abar_t') / (1 - abar_t) (1 - abar_t / abar_t')
        z_t' = z'
    z_0 = argmin_z ||y - A(D(z))||^2 from z_0 (latent optimisation); output x0 = D(z_0).
The pixel stage uses only A and its gradient (AdamW on the MSE), so it runs for nonlinear operators
too, as in the official code (its nonlinear-deblur task); no adjoint is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.interface import REQUIRED
from smc.optimise import latent_refinement, pixel_pseudo_inverse

from . import MethodSpec, register_method
from .common import Chain, chain_callbacks, check_chain_settings, gradient, require, residual_norm


@dataclass
class ReSampleConfig:
    """num_steps: timesteps 999 -> 0 (num_steps - 1 transitions); eta: DDIM stochasticity (0 in the code);
    zeta: latent DPS step, times abar_t, on the unsquared norm; skip: hard data consistency every
    `skip` steps; look_ahead: DDIM steps (UNet calls) to the zhat0 that is optimised;
    gamma: variance factor of the stochastic resampling;
    pixel_*: AdamW on ||y - A(x)||^2 (mean) stops below pixel_tol or after pixel_max_iters;
    latent_*: AdamW on ||y - A(D(z))||^2 (mean) stops below latent_tol, when the loss is higher than
    latent_patience iterations before, or after latent_max_iters;
    final_optimisation: the latent optimisation of z_0 at the end (the official output)."""
    num_steps: int = 500
    eta: float = 0.0
    zeta: float = 0.5
    skip: int = 10
    look_ahead: int = 5
    gamma: float = 40.0
    pixel_lr: float = 1e-2
    pixel_max_iters: int = 2000
    pixel_tol: float = 1e-6
    latent_lr: float = 5e-3
    latent_max_iters: int = 500
    latent_patience: int = 200
    latent_tol: float = 1e-6
    final_optimisation: bool = True

    def resolve(self) -> "ReSampleConfig":
        check_chain_settings(self.num_steps, self.eta)
        require(self.zeta >= 0 and self.gamma > 0, f"zeta must be >= 0 and gamma > 0, got {self.zeta}, {self.gamma}")
        require(isinstance(self.skip, int) and self.skip >= 1, f"skip must be an int >= 1, got {self.skip!r}")
        require(isinstance(self.look_ahead, int) and self.look_ahead >= 1,
                f"look_ahead must be an int >= 1, got {self.look_ahead!r}")
        require(self.pixel_max_iters >= 0 and self.latent_max_iters >= 0 and self.latent_patience >= 1,
                "the iteration limits must be >= 0 and latent_patience >= 1")
        require(self.pixel_lr > 0 and self.latent_lr > 0, "pixel_lr and latent_lr must be > 0")
        return self


def resample_sample(model, operator, y: torch.Tensor, cfg: ReSampleConfig, generator=None, cond=None,
                    callback=None):
    """Run ReSample for a batch of measurements y [B, ...]; returns a `MethodResult`."""
    run = Chain(model, y, generator, cond, callback, cfg.num_steps)
    abar, ts, K = run.abar, run.ts.tolist(), len(run.ts) - 1
    third = K // 3
    z = run.noise()                                                      # z_T ~ N(0, I)
    for i, t, t_next in run.transitions:
        # Latent DPS step: DDIM from z_t, minus zeta abar_t grad ||y - A(D(zbar0))||.
        with torch.enable_grad():
            z_t = z.detach().requires_grad_(True)
            eps, zbar0 = run.denoise(z_t, t)
            residual = residual_norm(operator, run.y, model.decode(zbar0))
            grad = gradient(residual, z_t)
        z = run.ddim_step(eps.detach(), zbar0.detach(), t, t_next, cfg.eta) - cfg.zeta * abar[t] * grad

        # Hard data consistency on the last two thirds, every `skip` steps.
        index = K - 1 - i
        if 0 < index <= K - third and index % cfg.skip == 0:
            zhat0 = _look_ahead(run, z, i + 1, cfg)
            if index >= third:      # pixel-space optimisation, then encode
                with torch.no_grad():
                    x_init = model.decode(zhat0)
                x_hat = pixel_pseudo_inverse(operator, run.y, x_init, cfg.pixel_lr, cfg.pixel_max_iters, cfg.pixel_tol)
                with torch.no_grad():
                    zhat0 = model.encode(x_hat)
            else:                   # latent-space optimisation
                zhat0 = _latent_optimisation(run, operator, zhat0, cfg)
            # Stochastic resampling back to level t'.
            s2 = cfg.gamma * (1 - abar[t_next]) / (1 - abar[t]) * (1 - abar[t] / abar[t_next])
            one_minus = 1 - abar[t_next]
            mean = (s2 * abar[t_next].sqrt() * zhat0 + one_minus * z) / (s2 + one_minus)
            z = mean + (s2 * one_minus / (s2 + one_minus)).sqrt() * run.noise()
        run.report(i, t, t_next, zbar0, z, residual)

    if cfg.final_optimisation:
        z = _latent_optimisation(run, operator, z, cfg)
    return run.finish(z, "resample", cfg)


def _look_ahead(run: Chain, z: torch.Tensor, level: int, cfg: ReSampleConfig) -> torch.Tensor:
    """Tweedie zhat0 after up to cfg.look_ahead - 1 unconditional DDIM steps from z at ts[level].

    The official code makes min(look_ahead, K - 1 - i) UNet calls here (the last call's DDIM output
    is discarded); so do we, stopping before the chain's end.
    """
    ts = run.ts.tolist()
    calls = min(cfg.look_ahead, len(ts) - 1 - level)
    with torch.no_grad():
        for j in range(level, level + calls):
            eps, zhat0 = run.denoise(z, ts[j])
            if j < level + calls - 1:
                z = run.ddim_step(eps, zhat0, ts[j], ts[j + 1], cfg.eta)
    return zhat0


def _latent_optimisation(run: Chain, operator, z_init: torch.Tensor, cfg: ReSampleConfig) -> torch.Tensor:
    """argmin_z MSE(y, A(D(z))) per image from z_init, returning the last iterate (as the official code)."""
    return latent_refinement(run.model, operator, run.y, z_init, cfg.latent_lr, cfg.latent_max_iters,
                             cfg.latent_patience, cfg.latent_tol, keep="last")


register_method(MethodSpec(
    name="resample", sample=resample_sample, config_cls=ReSampleConfig, needs=REQUIRED, linear_only=False,
    paper="Song et al., Solving Inverse Problems with Latent Diffusion Models via Hard Data Consistency, "
          "ICLR 2024 (ReSample)",
    code="github.com/soominkwon/resample (ldm/models/diffusion/ddim.py, resample_sampling; sample_condition.py)",
    callbacks=chain_callbacks))

"""Latent DPS (LDPS): diffusion posterior sampling with the LDM's latent as the diffusion variable.

Paper: Chung, Kim, Mccann, Klasky, Ye, *Diffusion Posterior Sampling for General Noisy Inverse
Problems*, ICLR 2023 (Algorithm 1, DPS); moved to the latent of an LDM (x = D(z)) as the "LDPS"
baseline of Rout et al., *Solving Linear Inverse Problems Provably via Posterior Sampling with
Latent Diffusion Models* (PSLD), NeurIPS 2023, and of the LD-SMC paper (Achituve et al., ICML 2025).
Code followed: github.com/DPS2022/diffusion-posterior-sampling (guided_diffusion/condition_methods.py,
`PosteriorSampling`: the gradient of the *unsquared* norm ||y - A(x0_hat)||, subtracted after the
ancestral step) and its latent version `ps` in github.com/soominkwon/resample
(ldm_inverse/condition_methods.py, default step 0.3). Defaults: configs/methods/ldps.yaml.

Algorithm (per transition t -> t', from z_T ~ N(0, I)):
    eps = eps_theta(z_t, t);  zbar0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    z'  = sqrt(abar_t') zbar0 + c_eps eps + sigma noise             (DDPM step: eta = 1)
    z_t' = z' - zeta grad_{z_t} ||y - A(D(zbar0))||
Output x0 = D(z_0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import MethodSpec, register_method
from .common import Chain, chain_callbacks, check_chain_settings, gradient, require, residual_norm


@dataclass
class LDPSConfig:
    """num_steps: timesteps 999 -> 0 (num_steps - 1 transitions); eta: 1 = DDPM step, 0 = DDIM;
    zeta: step size on the gradient of the unsquared norm ||y - A(D(zbar0))||."""
    num_steps: int = 1000
    eta: float = 1.0
    zeta: float = 0.3

    def resolve(self) -> "LDPSConfig":
        check_chain_settings(self.num_steps, self.eta)
        require(self.zeta >= 0, f"zeta must be >= 0, got {self.zeta}")
        return self


def ldps_sample(model, operator, y: torch.Tensor, cfg: LDPSConfig, generator=None, cond=None,
                callback=None):
    """Run latent DPS for a batch of measurements y [B, ...]; returns a `MethodResult`."""
    run = Chain(model, y, generator, cond, callback, cfg.num_steps)
    z = run.noise()                                                      # z_T ~ N(0, I)
    for i, t, t_next in run.transitions:
        with torch.enable_grad():
            z_t = z.detach().requires_grad_(True)
            eps, zbar0 = run.denoise(z_t, t)                             # Tweedie estimate zbar0(z_t)
            residual = residual_norm(operator, run.y, model.decode(zbar0))   # ||y - A(D(zbar0))||
            grad = gradient(residual, z_t)
        # DDPM step from z_t, then the DPS correction.
        z = run.ddim_step(eps.detach(), zbar0.detach(), t, t_next, cfg.eta) - cfg.zeta * grad
        run.report(i, t, t_next, zbar0, z, residual)
    return run.finish(z, "ldps", cfg)


register_method(MethodSpec(
    name="ldps", sample=ldps_sample, config_cls=LDPSConfig,
    needs=("eps", "decode", "alphas_cumprod", "latent_shape"), linear_only=False,
    paper="Chung et al., Diffusion Posterior Sampling for General Noisy Inverse Problems, ICLR 2023 "
          "(DPS), in latent space as the LDPS baseline of Rout et al., NeurIPS 2023 (PSLD)",
    code="github.com/DPS2022/diffusion-posterior-sampling (guided_diffusion/condition_methods.py, "
         "PosteriorSampling); github.com/soominkwon/resample (ldm_inverse/condition_methods.py, ps)",
    callbacks=chain_callbacks))

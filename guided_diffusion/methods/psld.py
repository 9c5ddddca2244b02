"""PSLD: posterior sampling with latent diffusion (latent DPS plus a projected gluing term).

Paper: Rout, Raoof, Daras, Caramanis, Dimakis, Shakkottai, *Solving Linear Inverse Problems
Provably via Posterior Sampling with Latent Diffusion Models*, NeurIPS 2023 (Algorithm 1; a
baseline of the LD-SMC paper). The gluing term asks zbar0 to be a fixed point of "decode, replace
the measured part of the image by the measurement, encode": A^T y + (I - A^T A) D(zbar0) keeps
D(zbar0) in the null space of A and takes the rest from y. Needs a linear A with its adjoint A^T.
Code followed: github.com/LituRout/PSLD (stable-diffusion/ldm/models/diffusion/psld.py,
`p_sample_ddim`, both the `inpainting` and the `general_inverse` branch; run scripts
stable-diffusion/run/inverse_*_ldm.sh for the FFHQ LDM). Defaults: configs/methods/psld.yaml.

Algorithm (per transition t -> t', from z_T ~ N(0, I)):
    eps = eps_theta(z_t, t);  zbar0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    z'  = sqrt(abar_t') zbar0 + c_eps eps + sigma noise           (DDIM with eta)
    z_t' = z' - grad_{z_t} [ omega ||y - A(D(zbar0))|| + gamma ||zbar0 - E(A^T y + (I - A^T A) D(zbar0))|| ]
Output x0 = D(z_0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.interface import REQUIRED

from . import MethodSpec, register_method
from .common import Chain, chain_callbacks, check_chain_settings, distance, gradient, require, residual_norm


@dataclass
class PSLDConfig:
    """num_steps: timesteps 999 -> 0; eta: 0 = DDIM (the PSLD code's default), 1 = DDPM;
    omega: weight of the measurement norm; gamma: weight of the gluing norm (both unsquared)."""
    num_steps: int = 1000
    eta: float = 0.0
    omega: float = 0.1
    gamma: float = 0.1

    def resolve(self) -> "PSLDConfig":
        check_chain_settings(self.num_steps, self.eta)
        require(self.omega >= 0 and self.gamma >= 0, f"omega and gamma must be >= 0, got {self.omega}, {self.gamma}")
        return self


def psld_sample(model, operator, y: torch.Tensor, cfg: PSLDConfig, generator=None, cond=None,
                callback=None):
    """Run PSLD for a batch of measurements y [B, ...] (A linear, with `operator.transpose`)."""
    run = Chain(model, y, generator, cond, callback, cfg.num_steps)
    At_y = operator.transpose(run.y)                                     # A^T y, fixed
    z = run.noise()                                                      # z_T ~ N(0, I)
    for i, t, t_next in run.transitions:
        with torch.enable_grad():
            z_t = z.detach().requires_grad_(True)
            eps, zbar0 = run.denoise(z_t, t)                             # Tweedie estimate zbar0(z_t)
            x0 = model.decode(zbar0)
            residual = residual_norm(operator, run.y, x0)                # ||y - A(D(zbar0))||
            x_glued = At_y + x0 - operator.transpose(operator(x0))      # A^T y + (I - A^T A) D(zbar0)
            gluing = distance(zbar0, model.encode(x_glued))
            grad = gradient(cfg.omega * residual + cfg.gamma * gluing, z_t)
        z = run.ddim_step(eps.detach(), zbar0.detach(), t, t_next, cfg.eta) - grad
        run.report(i, t, t_next, zbar0, z, residual)
    return run.finish(z, "psld", cfg)


register_method(MethodSpec(
    name="psld", sample=psld_sample, config_cls=PSLDConfig, needs=REQUIRED, linear_only=True,
    paper="Rout et al., Solving Linear Inverse Problems Provably via Posterior Sampling with Latent "
          "Diffusion Models, NeurIPS 2023 (PSLD)",
    code="github.com/LituRout/PSLD (stable-diffusion/ldm/models/diffusion/psld.py, p_sample_ddim; "
         "stable-diffusion/run/inverse_*_ldm.sh)",
    callbacks=chain_callbacks))

"""GML-DPS: latent DPS plus the "goodness modified latent" gluing term gamma ||zbar0 - E(D(zbar0))||.

Paper: Rout, Raoof, Daras, Caramanis, Dimakis, Shakkottai, *Solving Linear Inverse Problems
Provably via Posterior Sampling with Latent Diffusion Models*, NeurIPS 2023 (section 3: GML-DPS,
the step between LDPS and PSLD; a baseline of the LD-SMC paper). It asks zbar0 to be a fixed point
of E o D, so that the guided latent stays where the autoencoder is consistent.
Code followed: github.com/LituRout/PSLD (stable-diffusion/ldm/models/diffusion/psld.py,
`p_sample_ddim`: one loss omega ||y - A(D(zbar0))|| + gamma ||E(.) - zbar0||, both unsquared, its
gradient wrt z_t subtracted from the DDIM step; GML-DPS puts D(zbar0) where PSLD puts the
projected image). Defaults (the PSLD repository's LDM run scripts): configs/methods/gml_dps.yaml.

Algorithm (per transition t -> t', from z_T ~ N(0, I)):
    eps = eps_theta(z_t, t);  zbar0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    z'  = sqrt(abar_t') zbar0 + c_eps eps + sigma noise           (DDIM with eta)
    z_t' = z' - grad_{z_t} [ omega ||y - A(D(zbar0))|| + gamma ||zbar0 - E(D(zbar0))|| ]
Output x0 = D(z_0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.interface import REQUIRED

from . import MethodSpec, register_method
from .common import Chain, chain_callbacks, check_chain_settings, distance, gradient, require, residual_norm


@dataclass
class GMLDPSConfig:
    """num_steps: timesteps 999 -> 0; eta: 0 = DDIM (the PSLD code's default), 1 = DDPM;
    omega: weight of the measurement norm; gamma: weight of the gluing norm (both unsquared)."""
    num_steps: int = 1000
    eta: float = 0.0
    omega: float = 0.1
    gamma: float = 0.1

    def resolve(self) -> "GMLDPSConfig":
        check_chain_settings(self.num_steps, self.eta)
        require(self.omega >= 0 and self.gamma >= 0, f"omega and gamma must be >= 0, got {self.omega}, {self.gamma}")
        return self


def gml_dps_sample(model, operator, y: torch.Tensor, cfg: GMLDPSConfig, generator=None, cond=None,
                   callback=None):
    """Run GML-DPS for a batch of measurements y [B, ...]; returns a `MethodResult`."""
    run = Chain(model, y, generator, cond, callback, cfg.num_steps)
    z = run.noise()                                                      # z_T ~ N(0, I)
    for i, t, t_next in run.transitions:
        with torch.enable_grad():
            z_t = z.detach().requires_grad_(True)
            eps, zbar0 = run.denoise(z_t, t)                             # Tweedie estimate zbar0(z_t)
            x0 = model.decode(zbar0)
            residual = residual_norm(operator, run.y, x0)                # ||y - A(D(zbar0))||
            gluing = distance(zbar0, model.encode(x0))                   # ||zbar0 - E(D(zbar0))||
            grad = gradient(cfg.omega * residual + cfg.gamma * gluing, z_t)
        z = run.ddim_step(eps.detach(), zbar0.detach(), t, t_next, cfg.eta) - grad
        run.report(i, t, t_next, zbar0, z, residual)
    return run.finish(z, "gml_dps", cfg)


register_method(MethodSpec(
    name="gml_dps", sample=gml_dps_sample, config_cls=GMLDPSConfig, needs=REQUIRED, linear_only=False,
    paper="Rout et al., Solving Linear Inverse Problems Provably via Posterior Sampling with Latent "
          "Diffusion Models, NeurIPS 2023 (GML-DPS)",
    code="github.com/LituRout/PSLD (stable-diffusion/ldm/models/diffusion/psld.py, p_sample_ddim)",
    callbacks=chain_callbacks))

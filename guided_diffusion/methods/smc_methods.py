"""LD-SMC and latent TDS (LD-SMC without auxiliary observations) on the methods interface.

Both are `smc.ld_smc_sample`; this file only registers them. Latent TDS is the baseline of
the LD-SMC paper that weights and guides with the Tweedie twist alone (Wu et al., *Practical
and Asymptotically Exact Conditional Sampling in Diffusion Models*, NeurIPS 2023, moved to
the latent space): `aux_observations=False`, proposal g = kappa1 g1 at every step.
"""
from __future__ import annotations

from dataclasses import dataclass

from ldm.interface import REQUIRED
from smc import LDSMCConfig, ld_smc_sample, num_transitions

from . import MethodSpec, register_method


def _callbacks(cfg: LDSMCConfig, num_train_steps: int) -> int:
    """One callback per transition of each Gibbs iteration (the reference preset's chain has one more)."""
    return num_transitions(cfg, num_train_steps) * cfg.num_gibbs_iters


@dataclass
class LatentTDSConfig(LDSMCConfig):
    """LDSMCConfig with the auxiliary observations off (the only difference from LD-SMC)."""
    aux_observations: bool = False

    def resolve(self) -> LDSMCConfig:
        if self.aux_observations:
            raise ValueError("ltds is LD-SMC without auxiliary observations: aux_observations must stay "
                             "False (for LD-SMC use the method ld_smc)")
        return super().resolve()


register_method(MethodSpec(
    name="ld_smc", sample=ld_smc_sample, config_cls=LDSMCConfig, needs=REQUIRED, linear_only=False,
    paper="Achituve et al., Inverse Problem Sampling in Latent Space Using Sequential Monte Carlo, ICML 2025",
    code="github.com/IdanAchituve/LD-SMC (ldm/models/diffusion/ddim.py, class LD_SMC)",
    callbacks=_callbacks))

register_method(MethodSpec(
    name="ltds", sample=ld_smc_sample, config_cls=LatentTDSConfig,
    needs=tuple(n for n in REQUIRED if n != "encode"), linear_only=False,
    paper="Wu et al., Practical and Asymptotically Exact Conditional Sampling in Diffusion Models (TDS), "
          "NeurIPS 2023; in latent space as the LD-SMC paper's baseline",
    code="github.com/IdanAchituve/LD-SMC (LD_SMC without the auxiliary observations); "
         "github.com/blt2114/twisted_diffusion_sampler",
    callbacks=_callbacks))

"""LatentDAPS: decoupled annealing posterior sampling in the latent space of an LDM.

Paper: Zhang, Chu, Berner, Meng, Anandkumar, Song, *Improving Diffusion Inverse Problem Solving
with Decoupled Noise Annealing*, CVPR 2025 (Algorithm 1, DAPS; LatentDAPS in its latent-diffusion
experiments). Code followed: github.com/zhangbingliang2019/DAPS (sampler.py `LatentDAPS.sample`;
cores/scheduler.py `EDMScheduler`, `DiffusionPFODE`; cores/mcmc.py `MCMCSampler` (langevin, hmc,
prior_solver "gaussian"); forward_operator/__init__.py `LatentWrapper.gradient`; configs/task/*.yaml
group `ldm`; commands/ldm_ffhq.sh). Defaults: configs/methods/latent_daps.yaml.

DAPS works with the variance-exploding latent z = z0 + sigma n; the LDM's variance-preserving
z_t = z / sqrt(1 + sigma^2) at the timestep t with sigma_t = sqrt((1 - abar_t) / abar_t) nearest to
sigma (in log sigma), so the denoiser is D_sigma(z) = z - sigma eps_theta(z / sqrt(1 + sigma^2), t).

Algorithm (annealing levels sigma_0 = sigma_max > ... > sigma_{K-1} (EDM poly-rho grid to
sigma_min, its last point dropped), sigma_K = 0):
    z ~ N(0, sigma_max^2 I)
    for k = 0 .. K-1:
        zhat0 = Euler PF-ODE from sigma_k to ode_sigma_min in ode_steps steps (dz/dsigma = (z - D_sigma(z)) / sigma)
        z0y   = MCMC on p(z0 | z_k, y) from zhat0, score
                -clip(grad ||A(D(z0)) - y||^2) / tau^2 + (zhat0 - z0) / sigma_k^2,
                step lr_k = lr (1 + k / (K + 1) (lr_min_ratio - 1)), `mcmc_steps` Langevin or HMC steps
        z     = z0y + sigma_{k+1} n
    x0 = D(z)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import MethodSpec, register_method
from .common import Chain, require


@dataclass
class LatentDAPSConfig:
    """anneal_steps: annealing levels K; sigma_max, sigma_min, rho: the EDM poly-rho grid of levels;
    ode_steps, ode_sigma_min: Euler PF-ODE to zhat0; mcmc: "hmc" or "langevin"; mcmc_steps: MCMC
    steps per level; lr, lr_min_ratio: step size, decayed linearly to lr * lr_min_ratio;
    tau: the likelihood's std; momentum: HMC damping; grad_clip: element-wise clip of the data
    gradient (the official LatentWrapper clips to [-1, 1])."""
    anneal_steps: int = 50
    sigma_max: float = 10.0
    sigma_min: float = 0.1
    rho: float = 7.0
    ode_steps: int = 2
    ode_sigma_min: float = 0.001
    mcmc: str = "hmc"
    mcmc_steps: int = 15
    lr: float = 9.02e-6
    lr_min_ratio: float = 0.13
    tau: float = 0.01
    momentum: float = 0.74
    grad_clip: float = 1.0

    def resolve(self) -> "LatentDAPSConfig":
        require(isinstance(self.anneal_steps, int) and self.anneal_steps >= 1,
                f"anneal_steps must be an int >= 1, got {self.anneal_steps!r}")
        require(self.sigma_max > self.sigma_min > 0 and self.ode_sigma_min > 0,
                f"need sigma_max > sigma_min > 0 and ode_sigma_min > 0, got {self.sigma_max}, "
                f"{self.sigma_min}, {self.ode_sigma_min}")
        require(isinstance(self.ode_steps, int) and self.ode_steps >= 1, f"ode_steps must be an int >= 1")
        require(self.mcmc in ("hmc", "langevin"), f"mcmc must be 'hmc' or 'langevin', got {self.mcmc!r}")
        require(isinstance(self.mcmc_steps, int) and self.mcmc_steps >= 0, "mcmc_steps must be an int >= 0")
        require(self.lr > 0 and self.lr_min_ratio > 0 and self.tau > 0 and self.grad_clip > 0,
                "lr, lr_min_ratio, tau and grad_clip must be > 0")
        require(0.0 <= self.momentum < 1.0, f"momentum must lie in [0, 1), got {self.momentum}")
        return self


def edm_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float) -> list[float]:
    """n levels (sigma_max^(1/rho) + r (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, r = 0 .. 1."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + j / (n - 1) * (b - a)) ** rho for j in range(n)] if n > 1 else [sigma_max]


def latent_daps_sample(model, operator, y: torch.Tensor, cfg: LatentDAPSConfig, generator=None, cond=None,
                       callback=None):
    """Run LatentDAPS for a batch of measurements y [B, ...]; returns a `MethodResult`."""
    run = Chain(model, y, generator, cond, callback)
    log_sigma_t = (0.5 * ((1 - run.abar) / run.abar).log()).double()

    def t_of(sigma: float) -> int:                     # model timestep with the nearest sigma_t
        return 0 if sigma <= 0 else int((log_sigma_t - math.log(sigma)).abs().argmin())

    def denoise(z, sigma):                             # D_sigma(z) = z - sigma eps(z / sqrt(1 + sigma^2), t)
        t = torch.full((z.shape[0],), t_of(sigma), device=run.device, dtype=torch.long)
        return z - sigma * model.eps(z / math.sqrt(1 + sigma ** 2), t, run.cond)

    sigmas = edm_sigmas(cfg.sigma_max, cfg.sigma_min, cfg.anneal_steps + 1, cfg.rho)[:-1] + [0.0]
    run.ts = torch.tensor([t_of(s) for s in sigmas], device=run.device)
    z = cfg.sigma_max * run.noise()                                      # z ~ N(0, sigma_max^2 I)
    for k in range(cfg.anneal_steps):
        sigma = sigmas[k]
        # 1. Reverse diffusion: Euler PF-ODE from sigma_k to zhat0.
        with torch.no_grad():
            grid = edm_sigmas(sigma, cfg.ode_sigma_min, cfg.ode_steps + 1, cfg.rho)
            zhat0 = z
            for s, s_next in zip(grid[:-1], grid[1:]):
                zhat0 = zhat0 + (s_next - s) * (zhat0 - denoise(zhat0, s)) / s
        # 2. MCMC on p(z0 | z_k, y) from zhat0.
        lr = cfg.lr * (1 + k / (cfg.anneal_steps + 1) * (cfg.lr_min_ratio - 1))
        z0y, residual = _mcmc(run, operator, zhat0, sigma, lr, cfg)
        # 3. Forward diffusion to the next level.
        z = z0y + sigmas[k + 1] * run.noise() if sigmas[k + 1] > 0 else z0y
        run.report(k, t_of(sigma), t_of(sigmas[k + 1]), zhat0, z, residual)
    return run.finish(z, "latent_daps", cfg)


def _mcmc(run: Chain, operator, zhat0: torch.Tensor, sigma: float, lr: float, cfg: LatentDAPSConfig):
    """Langevin or (damped) HMC steps on log p(y | D(z0)) + log N(z0; zhat0, sigma^2 I).

    Returns z0y and ||y - A(D(zhat0))|| per image (from the first gradient evaluation, at zhat0).
    """
    z = zhat0.clone()
    v = run.noise() if cfg.mcmc == "hmc" else None
    residual = None
    for _ in range(cfg.mcmc_steps):
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            loss = (operator(run.model.decode(zg)) - run.y).pow(2).flatten(1).sum(1)   # ||A(D(z)) - y||^2
            grad, = torch.autograd.grad(loss.sum(), zg)
        if residual is None:
            residual = loss.detach().sqrt()
        score = -grad.clamp(-cfg.grad_clip, cfg.grad_clip) / cfg.tau ** 2 + (zhat0 - z) / sigma ** 2
        noise = run.noise()
        if cfg.mcmc == "langevin":
            z = z + lr * score + math.sqrt(2 * lr) * noise
        else:
            v = cfg.momentum * v + math.sqrt(lr) * score + math.sqrt(2 * (1 - cfg.momentum)) * noise
            z = z + math.sqrt(lr) * v
    return z.detach(), residual


register_method(MethodSpec(
    name="latent_daps", sample=latent_daps_sample, config_cls=LatentDAPSConfig,
    needs=("eps", "decode", "alphas_cumprod", "latent_shape"), linear_only=False,
    paper="Zhang et al., Improving Diffusion Inverse Problem Solving with Decoupled Noise Annealing, "
          "CVPR 2025 (DAPS; LatentDAPS)",
    code="github.com/zhangbingliang2019/DAPS (sampler.py LatentDAPS; cores/mcmc.py; cores/scheduler.py)",
    callbacks=lambda cfg, num_train_steps: cfg.anneal_steps))

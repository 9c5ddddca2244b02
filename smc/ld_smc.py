"""LD-SMC: SMC in the latent space of a latent diffusion model (spec `ld-smc.md`).

Batched: B images x N particles run as one flat batch [B*N, ...], image-major (row
b*N + n is particle n of image b). Each image has its own weights, normalisation,
resampling and torch.Generator, so its result does not depend on the batch it ran in.

Indexing: ts = [t_0 = 999 > t_1 > ... > t_K = 0]; transition i goes t_i -> t_{i+1}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ldm.interface import REQUIRED, check_model, model_device

from .auxiliary import heuristic_path, heuristic_zhat0, observations_from_path, selected_path
from .config import LDSMCConfig
from .optimise import latent_refinement
from .resampling import ess, normalise_log_weights, per_image_generators, randn_per_image, resample
from .schedule import ddim_eta1_coeffs, strided_timesteps, tweedie_zbar0


@dataclass
class TransitionState:
    """What `callback` sees after each transition t -> t_next (weights already updated)."""
    gibbs_iter: int
    step: int                    # transition index i (0 .. K-1)
    t: int
    t_next: int
    ess: torch.Tensor            # [B]
    log_weights: torch.Tensor    # [B, N], normalised
    zbar0: torch.Tensor          # [B, N, *latent] Tweedie estimate at the new level (z_0 at t = 0)
    resampled: torch.Tensor      # [B] bool: image b resampled before this transition


@dataclass
class LDSMCResult:
    """Sampler output. With select="all", x0 / x0_refined / z0 carry an extra N dim."""
    x0: torch.Tensor                       # [B, C, H, W] decoded selected particle
    x0_refined: Optional[torch.Tensor]     # [B, C, H, W] D(z_opt), None if refine=False
    z0: torch.Tensor                       # [B, *latent]
    x0_per_gibbs: torch.Tensor             # [J, B, C, H, W]
    particles_z0: torch.Tensor             # [B, N, *latent] (last Gibbs iteration)
    log_weights: torch.Tensor              # [B, N] normalised final log-weights
    ess: torch.Tensor                      # [B, K] after each transition (last Gibbs iteration)
    ancestors: torch.Tensor                # [K, B, N] (last Gibbs iteration)
    selected: torch.Tensor                 # [B] index of the selected particle (-1 for "all")
    timesteps: torch.Tensor                # [K+1]
    preset: str
    config: LDSMCConfig                    # resolved config that ran


class _Densities:
    """The log-densities of spec sections 3-4, batched over flat particles.

    "mean": mean over dims of -(x-m)^2 / (2 var) (reference); "sum": the full Gaussian
    log-density sum over dims (exact). Shapes: x, m [M, ...] -> [M].
    """

    def __init__(self, cfg: LDSMCConfig, abar: torch.Tensor):
        self.cfg, self.abar = cfg, abar

    def gauss(self, x: torch.Tensor, m: torch.Tensor, var) -> torch.Tensor:
        r2 = (x - m).pow(2).flatten(1)
        var = torch.as_tensor(var, dtype=r2.dtype, device=r2.device)
        if self.cfg.log_density == "mean":
            return -0.5 * r2.mean(1) / var
        return -0.5 * r2.sum(1) / var - 0.5 * r2.shape[1] * torch.log(2 * math.pi * var)

    def aux_var(self, t: int):
        """Variance of l(y_t | z_t): 1 - abar_t for t > 0; at t = 0 sigma_y^2 (exact) or 1 - abar_0."""
        if t == 0 and self.cfg.final_std_sigma_y:
            return self.cfg.sigma_y ** 2
        return 1 - self.abar[t]

    def twist_var(self, t: int):
        """Variance of lbar(y0 | z_t): 1 - abar_t (+ sigma_y^2 in the exact preset)."""
        return 1 - self.abar[t] + (self.cfg.sigma_y ** 2 if self.cfg.twist_var_sigma_y else 0.0)


def _unit_clip(g: torch.Tensor) -> torch.Tensor:
    """g / max(||g||, 1) per particle (row)."""
    norm = g.flatten(1).norm(dim=1).clamp_min(1.0)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def ld_smc_sample(model, operator: Callable, y: torch.Tensor, cfg: LDSMCConfig,
                  generator=None, cond: Optional[torch.Tensor] = None,
                  callback: Optional[Callable[[TransitionState], None]] = None) -> LDSMCResult:
    """Run LD-SMC (or latent TDS when cfg.aux_observations is False) for a batch of images.

    model: the latent-diffusion protocol of `ldm/interface.py` (eps, decode, encode,
        alphas_cumprod, latent_shape; device optional); operator: A, a callable on flat image batches;
    y: measurements y_0 [B, ...]; cond: per-image conditioning [B] (or None);
    generator: one torch.Generator or a list of B. Returns an `LDSMCResult`.
    """
    if not isinstance(cfg, LDSMCConfig):
        raise TypeError(f"cfg must be an LDSMCConfig, got {type(cfg).__name__}")
    cfg = cfg.resolve()
    # Latent TDS never encodes: only LD-SMC's auxiliary path needs E.
    check_model(model, REQUIRED if cfg.aux_observations else [n for n in REQUIRED if n != "encode"],
                who="LD-SMC" if cfg.aux_observations else "latent TDS")
    device = model_device(model)
    abar = model.alphas_cumprod.to(device)
    if y.dim() < 2:
        raise ValueError(f"y must be a batch [B, ...] of measurements, got shape {tuple(y.shape)}")
    y0 = y.to(device=device, dtype=abar.dtype).detach()
    B, N, J = y0.shape[0], cfg.num_particles, cfg.num_gibbs_iters
    if cond is not None and cond.shape[0] != B:
        raise ValueError(f"cond has {cond.shape[0]} rows for {B} measurements: pass one per image")
    gens = per_image_generators(generator, B, device)
    ts_t = strided_timesteps(cfg.num_steps, abar.numel()).to(device)
    ts = ts_t.tolist()
    K = len(ts) - 1
    dens = _Densities(cfg, abar)
    aux_device = torch.device(cfg.aux_device) if cfg.aux_device is not None else device

    # Section 2: auxiliary observations y_t, Gibbs iteration 0 (heuristic forward pass).
    ys = None
    if cfg.aux_observations:
        zhat0 = heuristic_zhat0(model, operator, y0, gens, cfg, device)
        path = heuristic_path(zhat0, ts_t, abar, gens)
        ys = observations_from_path(model, operator, path, ts_t, abar,
                                    gens, cfg.noisy_aux_obs, cfg.decode_chunk).to(aux_device)

    x0_per_gibbs = []
    for j in range(J):
        keep_states = cfg.aux_observations and j < J - 1
        out = _smc_iteration(model, operator, y0, ys, cfg, dens, ts, gens, cond, callback, j,
                             keep_states)
        z0_all, log_w = out["z0"], out["log_w"]
        # End: select a particle per image.
        if cfg.select == "max_weight":
            sel = log_w.argmax(1)
        elif cfg.select == "sample":
            sel = torch.stack([torch.multinomial(log_w[b].exp().double(), 1, generator=gens[b])[0]
                               for b in range(B)]).to(device)
        else:
            sel = torch.full((B,), -1, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)
        with torch.no_grad():
            if cfg.select == "all":
                z0 = z0_all
                x0 = model.decode(z0_all.flatten(0, 1)).unflatten(0, (B, N))
            else:
                z0 = z0_all[rows, sel]
                x0 = model.decode(z0)
        x0_per_gibbs.append(x0)
        if keep_states:
            # Gibbs iteration j+1: y_t recomputed along the selected particle's path.
            path_sel = selected_path(out["states"], out["ancestors"],
                                     sel if cfg.select != "all" else log_w.argmax(1))
            ys = observations_from_path(model, operator, path_sel[:K], ts_t,
                                        abar, gens, cfg.noisy_aux_obs, cfg.decode_chunk).to(aux_device)

    # Section 3, refinement: z_opt = argmin_z MSE(y0, A(D(z))) from z_0.
    x0_refined = None
    if cfg.refine:
        flat = z0.flatten(0, 1) if cfg.select == "all" else z0
        y_rep = y0.repeat_interleave(flat.shape[0] // B, 0)
        z_opt = latent_refinement(model, operator, y_rep, flat, cfg.refine_lr,
                                  cfg.refine_max_iters, cfg.refine_patience, cfg.refine_tol,
                                  keep=cfg.refine_return)
        with torch.no_grad():
            x0_refined = model.decode(z_opt)
        if cfg.select == "all":
            x0_refined = x0_refined.unflatten(0, (B, N))
    return LDSMCResult(x0=x0, x0_refined=x0_refined, z0=z0, x0_per_gibbs=torch.stack(x0_per_gibbs),
                       particles_z0=z0_all, log_weights=log_w, ess=out["ess"],
                       ancestors=out["ancestors"], selected=sel,
                       timesteps=ts_t.cpu(), preset=cfg.preset, config=cfg)


def _smc_iteration(model, operator, y0, ys, cfg, dens, ts: List[int], gens, cond, callback,
                   gibbs_iter: int, keep_states: bool):
    """One SMC pass over z (spec section 3) for fixed y_{1:T}; returns a dict of tensors."""
    device = model_device(model)
    abar = model.alphas_cumprod.to(device)
    B, N, K = y0.shape[0], cfg.num_particles, len(ts) - 1
    lat = tuple(model.latent_shape)
    y0_flat = y0.repeat_interleave(N, 0)
    cond_flat = cond.repeat_interleave(N, 0) if cond is not None else None
    weigh = N > 1  # with one particle the weights are irrelevant: skip their decodes

    def y_at(i):  # observation attached to level i: y_t for t > 0, y_0 at the last level
        return y0_flat if i == K else ys[i].to(device, non_blocking=True).repeat_interleave(N, 0)

    def guided_forward(z, i):
        """eps, zbar0, A(D(zbar0)) at level i, and g1 = d/dz ||y0 - A(D(zbar0(z)))||^2 clipped.

        One UNet forward+backward and one decoder forward+backward; A(D(zbar0)) also
        gives lbar(y0 | z) for the weights (computed once, used twice).
        """
        t = ts[i]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            eps = model.eps(z, torch.full((z.shape[0],), t, device=device, dtype=torch.long), cond_flat)
            zbar0 = tweedie_zbar0(z, eps, abar[t])
            f0 = operator(model.decode(zbar0))
            sq = (y0_flat - f0).pow(2).flatten(1).sum(1)
            g1, = torch.autograd.grad(sq.sum(), z)
        return eps.detach(), zbar0.detach(), f0.detach(), _unit_clip(g1)

    def l_aux(z, i):  # l(y_t | z_t) at level i ([B*N])
        with torch.no_grad():
            return dens.gauss(y_at(i), operator(model.decode(z)), dens.aux_var(ts[i]))

    # Start: z_T ~ N(0, I); log w = l(y_T | z_T) + lbar(y0 | z_T).
    z = randn_per_image(gens, (N, *lat), device, abar.dtype).flatten(0, 1)
    eps, zbar0, f0, g1 = guided_forward(z, 0)
    lbar = dens.gauss(y0_flat, f0, dens.twist_var(ts[0]))
    log_w = lbar.clone()
    if cfg.aux_observations and weigh:
        log_w = log_w + l_aux(z, 0)
    log_w = normalise_log_weights(log_w.view(B, N))
    states = [z.view(B, N, *lat)] if keep_states else None
    ess_trace, ancestors = [], []
    arange_n = torch.arange(N, device=device).expand(B, N)

    for i in range(K):
        t, t_next = ts[i], ts[i + 1]
        # 1. Resample (reference: every step but the first; else when ESS < c N).
        if N > 1 and cfg.ess_threshold is None:
            do = torch.full((B,), i > 0, device=device)
        elif N > 1:
            do = ess(log_w) < cfg.ess_threshold * N
        else:
            do = torch.zeros(B, dtype=torch.bool, device=device)
        a = arange_n.clone()
        if bool(do.any()):
            a[do] = resample(log_w[do], [g for g, d in zip(gens, do.tolist()) if d], cfg.resampling)
            log_w = torch.where(do[:, None], torch.full_like(log_w, -math.log(N)), log_w)
        flat_a = (a + N * torch.arange(B, device=device)[:, None]).flatten()
        z, eps, zbar0, g1, lbar = (v[flat_a] for v in (z, eps, zbar0, g1, lbar))
        ancestors.append(a)

        # 2. Proposal pi(z_t' | z_t) = N(mu_theta(z_t) - g, sigma^2 I).
        sigma, c_eps = ddim_eta1_coeffs(abar[t], abar[t_next])
        mu = abar[t_next].sqrt() * zbar0 + c_eps * eps
        if cfg.aux_observations and t_next <= cfg.s:
            with torch.enable_grad():
                m = mu.detach().requires_grad_(True)
                sq = (y_at(i + 1) - operator(model.decode(m))).pow(2).flatten(1).sum(1)
                g2, = torch.autograd.grad(sq.sum(), m)
            g = cfg.kappa2 * ((1 - cfg.rho) * g1 + cfg.rho * _unit_clip(g2))
        else:
            g = cfg.kappa1 * g1
        m_pi = mu - g
        noise = randn_per_image(gens, (N, *lat), device, abar.dtype).flatten(0, 1)
        z_new = m_pi + sigma * noise

        # 3. Weight: l(y_t'|z_t') + lbar(y0|z_t') - lbar(y0|z_t) + log p(z_t'|z_t) - log pi(z_t'|z_t).
        if i + 1 < K:
            eps, zbar0_new, f0, g1 = guided_forward(z_new, i + 1)
            lbar_new = dens.gauss(y0_flat, f0, dens.twist_var(t_next))
        else:  # t' = 0: lbar(y0 | z_0) = 0, l(y0 | z_0) is the real likelihood
            zbar0_new, lbar_new = z_new, torch.zeros_like(lbar)
        incr = lbar_new - lbar
        if weigh:
            incr = incr + dens.gauss(z_new, mu, sigma ** 2) - dens.gauss(z_new, m_pi, sigma ** 2)
            if cfg.aux_observations or i + 1 == K:
                incr = incr + l_aux(z_new, i + 1)
        log_w = normalise_log_weights(log_w + incr.view(B, N))
        z, zbar0, lbar = z_new, zbar0_new, lbar_new
        ess_trace.append(ess(log_w))
        if keep_states:
            states.append(z.view(B, N, *lat))
        if callback is not None:
            callback(TransitionState(gibbs_iter, i, t, t_next, ess_trace[-1], log_w.detach(),
                                     zbar0.view(B, N, *lat), do))

    return dict(z0=z.view(B, N, *lat).detach(), log_w=log_w, ess=torch.stack(ess_trace, 1),
                ancestors=torch.stack(ancestors),
                states=torch.stack(states) if keep_states else None)

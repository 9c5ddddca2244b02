"""LD-SMC: SMC in the latent space of a latent diffusion model (spec `ld-smc.md`).

Batched: B images x N particles run as one flat batch [B*N, ...], image-major (row
b*N + n is particle n of image b). Each image has its own weights, normalisation,
resampling and torch.Generator, so its result does not depend on the batch it ran in.

Indexing (`smc.levels.Chain`): level m has UNet timestep t[m] and abar index a[m];
transition i goes level i -> level i+1 (abar_{a[i]} -> abar_{a_next[i]}). Without
`start_at_T`, t = a = [999 > ... > 0]; with it (the release), one more level at t = 1000
comes first, with abar_999.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ldm.interface import REQUIRED, check_model, model_device

from .auxiliary import heuristic_path, heuristic_zhat0, observations_from_path, selected_path
from .config import LDSMCConfig
from .densities import Densities, check_finite, unit_clip
from .draws import DrawSource, GeneratorDraws
from .levels import Chain, make_chain
from .optimise import latent_refinement
from .resampling import ess, normalise_log_weights, per_image_generators
from .schedule import tweedie_zbar0


@dataclass
class TransitionState:
    """What `callback` sees after each transition t -> t_next (weights already updated)."""
    gibbs_iter: int
    step: int                    # transition index i (0 .. L-2)
    t: int                       # UNet timestep of level i
    t_next: int                  # UNet timestep of level i+1
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
    x0_refined_per_gibbs: Optional[torch.Tensor]  # [J, B, C, H, W] with refine_each_gibbs, else None
    particles_z0: torch.Tensor             # [B, N, *latent] (last Gibbs iteration)
    log_weights: torch.Tensor              # [B, N] normalised final log-weights
    ess: torch.Tensor                      # [B, L-1] after each transition (last Gibbs iteration)
    ancestors: torch.Tensor                # [L-1, B, N] (last Gibbs iteration)
    selected: torch.Tensor                 # [B] index of the selected particle (-1 for "all")
    timesteps: torch.Tensor                # [L] UNet timestep of each level
    preset: str
    config: LDSMCConfig                    # resolved config that ran


@dataclass
class _Level:
    """The particles of one level and what the transition leaving it needs ([B*N, ...] each).

    mu = mu_theta(z) of the step leaving the level; g1 clipped, g1_norm its raw norm;
    lbar = lbar(y0 | z); mu_prior: the mean of the one-model-step kernel leaving the level
    (only with `log_prior_new_moments`). At the last level (t = 0) only z, zbar0 = z and
    lbar = 0 are set, and with `log_prior_new_moments` eps, zbar0 (Tweedie at t = 0) and
    mu_prior = zbar0.
    """
    z: torch.Tensor
    lbar: torch.Tensor
    zbar0: torch.Tensor
    eps: Optional[torch.Tensor] = None
    mu: Optional[torch.Tensor] = None
    g1: Optional[torch.Tensor] = None
    g1_norm: Optional[torch.Tensor] = None
    mu_prior: Optional[torch.Tensor] = None

    def take(self, rows: torch.Tensor) -> "_Level":
        """The level after resampling: every particle replaced by its ancestor `rows`."""
        return _Level(*(None if v is None else v[rows] for v in
                        (self.z, self.lbar, self.zbar0, self.eps, self.mu, self.g1, self.g1_norm,
                         self.mu_prior)))


def _no_trace(event: str, **values) -> None:
    pass


def ld_smc_sample(model, operator: Callable, y: torch.Tensor, cfg: LDSMCConfig,
                  generator=None, cond: Optional[torch.Tensor] = None,
                  callback: Optional[Callable[[TransitionState], None]] = None,
                  trace: Optional[Callable[..., None]] = None) -> LDSMCResult:
    """Run LD-SMC (or latent TDS when cfg.aux_observations is False) for a batch of images.

    model: the latent-diffusion protocol of `ldm/interface.py` (eps, decode, encode,
        alphas_cumprod, latent_shape; device optional); operator: A, a callable on flat image batches;
    y: measurements y_0 [B, ...]; cond: per-image conditioning [B] (or None);
    generator: one torch.Generator, a list of B, or a `smc.draws.DrawSource` answering every
        random draw; callback(TransitionState): after each transition;
    trace(event, **values): every intermediate value (docs/sampler.md lists the events), for
        tests and the release replay; None in normal use. Returns an `LDSMCResult`.
    Raises NonFiniteWeightsError when a log-weight or a particle stops being finite.
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
    draws = (generator if isinstance(generator, DrawSource)
             else GeneratorDraws(per_image_generators(generator, B, device)))
    chain = make_chain(cfg.num_steps, abar.numel(), cfg.start_at_T, cfg.aux_one_step_below)
    L = chain.num_levels
    emit = trace if trace is not None else _no_trace
    aux_device = torch.device(cfg.aux_device) if cfg.aux_device is not None else device

    def observations(path):  # y_t of levels 0 .. L-2 from one latent each: [L-1, B, *latent]
        return observations_from_path(model, operator, path, abar[chain.a[:-1]], draws,
                                      cfg.noisy_aux_obs, cfg.decode_chunk).to(aux_device)

    # Section 2: auxiliary observations y_t, Gibbs iteration 0 (heuristic forward pass).
    ys = None
    if cfg.aux_observations:
        zhat0 = heuristic_zhat0(model, operator, y0, draws, cfg, device, emit)
        path = heuristic_path(zhat0, chain.path_a, abar, draws)
        ys = observations(path[chain.aux])
        emit("aux_observations", gibbs_iter=0, path=path, ys=ys)

    x0_per_gibbs, x0_refined_per_gibbs = [], []
    for j in range(J):
        keep_states = cfg.aux_observations and j < J - 1
        out = _smc_iteration(model, operator, y0, ys, cfg, chain, draws, cond, callback, emit, j,
                             keep_states)
        z0_all, log_w = out["z0"], out["log_w"]
        # End: select a particle per image.
        if cfg.select == "max_weight":
            sel = log_w.argmax(1)
        elif cfg.select == "sample":
            sel = draws.categorical(log_w)
        else:
            sel = torch.full((B,), -1, dtype=torch.long, device=device)
        with torch.no_grad():
            if cfg.select == "all":
                z0 = z0_all
                x0 = model.decode(z0_all.flatten(0, 1)).unflatten(0, (B, N))
            else:
                z0 = z0_all[torch.arange(B, device=device), sel]
                x0 = model.decode(z0)
        x0_per_gibbs.append(x0)
        emit("select", gibbs_iter=j, selected=sel, z0=z0, x0=x0, ancestors=out["ancestors"])
        # Refinement after the last Gibbs iteration (after every one with refine_each_gibbs).
        if cfg.refine and (cfg.refine_each_gibbs or j == J - 1):
            x0_refined_per_gibbs.append(_refine(model, operator, y0, z0, cfg, emit, j))
        if keep_states:
            # Gibbs iteration j+1: y_t recomputed along the selected particle's path
            # (level m's y_t from the selected ancestor at level m).
            path_sel = selected_path(out["states"], out["ancestors"],
                                     sel if cfg.select != "all" else log_w.argmax(1))
            ys = observations(path_sel[:L - 1])
            emit("aux_observations", gibbs_iter=j + 1, path=path_sel, ys=ys)

    return LDSMCResult(
        x0=x0, x0_refined=x0_refined_per_gibbs[-1] if cfg.refine else None, z0=z0,
        x0_per_gibbs=torch.stack(x0_per_gibbs),
        x0_refined_per_gibbs=torch.stack(x0_refined_per_gibbs) if cfg.refine and cfg.refine_each_gibbs else None,
        particles_z0=z0_all, log_weights=log_w, ess=out["ess"], ancestors=out["ancestors"], selected=sel,
        timesteps=torch.tensor(chain.t), preset=cfg.preset, config=cfg)


def _refine(model, operator, y0, z0, cfg, emit, gibbs_iter: int) -> torch.Tensor:
    """Section 3, refinement: z_opt = argmin_z MSE(y0, A(D(z))) from z_0; returns D(z_opt)."""
    B = y0.shape[0]
    flat = z0.flatten(0, 1) if cfg.select == "all" else z0
    y_rep = y0.repeat_interleave(flat.shape[0] // B, 0)
    z_opt = latent_refinement(
        model, operator, y_rep, flat, cfg.refine_lr, cfg.refine_max_iters, cfg.refine_patience,
        cfg.refine_tol, keep=cfg.refine_return,
        on_step=lambda it, loss, z: emit("refine_step", gibbs_iter=gibbs_iter, it=it, loss=loss, z=z))
    with torch.no_grad():
        x_opt = model.decode(z_opt)
    emit("refine", gibbs_iter=gibbs_iter, z_opt=z_opt, x_opt=x_opt)
    return x_opt.unflatten(0, (B, -1)) if cfg.select == "all" else x_opt


def _smc_iteration(model, operator, y0, ys, cfg, chain: Chain, draws, cond, callback, emit,
                   gibbs_iter: int, keep_states: bool):
    """One SMC pass over z (spec section 3) for fixed y_{1:T}; returns a dict of tensors."""
    device = model_device(model)
    abar = model.alphas_cumprod.to(device)
    B, N, L = y0.shape[0], cfg.num_particles, chain.num_levels
    lat = tuple(model.latent_shape)
    dens = Densities(cfg, abar)
    sqrt_abar_next, c_eps, sigmas = chain.step_coeffs(abar)   # per transition: its DDIM step
    prior_sqrt_next, prior_c_eps, prior_sigmas = chain.prior_coeffs(abar)   # per level, one model step
    y0_flat = y0.repeat_interleave(N, 0)
    cond_flat = cond.repeat_interleave(N, 0) if cond is not None else None
    weigh = N > 1  # with one particle the weights are irrelevant: skip their decodes

    def y_at(m):  # observation attached to level m: y_t for t > 0, y_0 at the last level
        return y0_flat if m == L - 1 else ys[m].to(device, non_blocking=True).repeat_interleave(N, 0)

    def eps_zbar0(z, m):  # eps_theta(z, t) and the Tweedie zbar0 at level m
        eps = model.eps(z, torch.full((z.shape[0],), chain.t[m], device=device, dtype=torch.long), cond_flat)
        return eps, tweedie_zbar0(z, eps, abar[chain.a[m]])

    def level(z, m) -> _Level:
        """Level m < L-1: eps, zbar0, mu_theta, lbar and g1 = d/dz ||y0 - A(D(zbar0(z)))||^2.

        One UNet forward+backward and one decoder forward+backward; A(D(zbar0)) gives both
        g1 and lbar(y0 | z) (computed once, used twice).
        """
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            eps, zbar0 = eps_zbar0(z, m)
            f0 = operator(model.decode(zbar0))
            sq = (y0_flat - f0).pow(2).flatten(1).sum(1)
            g1, = torch.autograd.grad(sq.sum(), z)
        eps, zbar0 = eps.detach(), zbar0.detach()
        g1, g1_norm = unit_clip(g1)
        return _Level(z=z.detach(), lbar=dens.gauss(y0_flat, f0.detach(), dens.twist_var(chain.a[m])),
                      zbar0=zbar0, eps=eps, mu=sqrt_abar_next[m] * zbar0 + c_eps[m] * eps, g1=g1, g1_norm=g1_norm,
                      mu_prior=prior_mean(eps, zbar0, m))

    def prior_mean(eps, zbar0, m):  # log_prior_new_moments: mean of the one-model-step kernel leaving m
        if not (weigh and cfg.log_prior_new_moments):
            return None
        return prior_sqrt_next[m] * zbar0 + prior_c_eps[m] * eps

    def last_level(z) -> _Level:
        """t = 0: lbar(y0 | z_0) = 0. Its own moments only for log_prior_new_moments (mean zbar0)."""
        zero = torch.zeros(z.shape[0], dtype=z.dtype, device=device)
        if not (weigh and cfg.log_prior_new_moments):
            return _Level(z=z, lbar=zero, zbar0=z)
        with torch.no_grad():
            eps, zbar0 = eps_zbar0(z, L - 1)
        return _Level(z=z, lbar=zero, zbar0=zbar0, eps=eps, mu_prior=prior_mean(eps, zbar0, L - 1))

    def l_aux(z, m):  # l(y_t | z_t) at level m ([B*N])
        with torch.no_grad():
            return dens.gauss(y_at(m), operator(model.decode(z)), dens.aux_var(chain.a[m]))

    def g2_at(mu, m):  # g2 = d/dmu ||y_t - A(D(mu))||^2 at mu_theta(z_{t+1}) (decoder only), clipped
        with torch.enable_grad():
            mu = mu.detach().requires_grad_(True)
            sq = (y_at(m) - operator(model.decode(mu))).pow(2).flatten(1).sum(1)
            g2, = torch.autograd.grad(sq.sum(), mu)
        return unit_clip(g2)

    # Start: z_T ~ N(0, I); log w = l(y_T | z_T) + lbar(y0 | z_T).
    cur = level(draws.randn("particles", (N, *lat), device, abar.dtype).flatten(0, 1), 0)
    l_y = l_aux(cur.z, 0) if cfg.aux_observations and weigh else torch.zeros_like(cur.lbar)
    log_w = (cur.lbar + l_y).view(B, N)
    emit("start", gibbs_iter=gibbs_iter, t=chain.t[0], a=chain.a[0], level=cur, l_aux=l_y, log_w=log_w,
         sigma=sigmas[0], y_var=dens.aux_var(chain.a[0]), twist_var=dens.twist_var(chain.a[0]))
    check_finite(log_w, cur.z, None, chain.t[0])
    log_w = normalise_log_weights(log_w)
    states = [cur.z.view(B, N, *lat)] if keep_states else None
    ess_trace, ancestors = [], []
    arange_n = torch.arange(N, device=device).expand(B, N)

    for i in range(L - 1):
        # 1. Resample (reference: every step but the first; else when ESS < c N).
        if N > 1 and cfg.ess_threshold is None:
            do = torch.full((B,), i > 0, device=device)
        elif N > 1:
            do = ess(log_w) < cfg.ess_threshold * N
        else:
            do = torch.zeros(B, dtype=torch.bool, device=device)
        a = arange_n.clone()
        if bool(do.any()):
            a[do] = draws.resample(log_w[do], do.nonzero()[:, 0].tolist(), cfg.resampling)
            log_w = torch.where(do[:, None], torch.full_like(log_w, -math.log(N)), log_w)
        cur = cur.take((a + N * torch.arange(B, device=device)[:, None]).flatten())
        ancestors.append(a)

        # 2. Proposal pi(z_t | z_{t+1}) = N(mu_theta(z_{t+1}) - g, sigma^2 I).
        sigma = sigmas[i]
        g2 = g2_norm = None
        if cfg.aux_observations and chain.t[i + 1] <= cfg.s:
            g2, g2_norm = g2_at(cur.mu, i + 1)
            g = cfg.kappa2 * ((1 - cfg.rho) * cur.g1 + cfg.rho * g2)
        else:
            g = cfg.kappa1 * cur.g1
        m_pi = cur.mu - g
        z_new = m_pi + sigma * draws.randn("proposal", (N, *lat), device, abar.dtype).flatten(0, 1)

        # 3. Weight: l(y_t|z_t) + lbar(y0|z_t) - lbar(y0|z_t+1) + log p(z_t|z_t+1) - log pi(z_t|z_t+1).
        new = level(z_new, i + 1) if i + 1 < L - 1 else last_level(z_new)
        # log p(z_t | z_t+1) = N(mu_theta(z_t+1), sigma^2) of the step that proposed z_t; the
        # release (log_prior_new_moments) takes the moments computed at z_t itself.
        prior_mu, prior_sigma = ((new.mu_prior, prior_sigmas[i + 1]) if cfg.log_prior_new_moments
                                 else (cur.mu, sigma))
        incr = new.lbar - cur.lbar
        log_p = log_pi = l_y = None
        if weigh:
            log_p = dens.gauss(z_new, prior_mu, prior_sigma ** 2)
            log_pi = dens.gauss(z_new, m_pi, sigma ** 2)
            incr = incr + log_p - log_pi
            if cfg.aux_observations or i + 1 == L - 1:
                l_y = l_aux(z_new, i + 1)
                incr = incr + l_y
        log_w_new = log_w + incr.view(B, N)
        emit("transition", gibbs_iter=gibbs_iter, step=i, t=chain.t[i + 1], a=chain.a[i + 1], resampled=do,
             ancestors=a, log_w_prev=log_w, lbar_prev=cur.lbar, g2=g2, g2_norm=g2_norm, m_pi=m_pi,
             sigma=sigma, level=new, sigma_prior=prior_sigma,
             l_aux=l_y, log_prior=log_p, log_pi=log_pi, log_w=log_w_new,
             y_var=dens.aux_var(chain.a[i + 1]), twist_var=dens.twist_var(chain.a[i + 1]))
        check_finite(log_w_new, z_new, i, chain.t[i + 1])
        log_w = normalise_log_weights(log_w_new)
        cur = new
        ess_trace.append(ess(log_w))
        if keep_states:
            states.append(z_new.view(B, N, *lat))
        if callback is not None:
            zbar0 = cur.zbar0 if i + 1 < L - 1 else z_new   # at t = 0: z_0 itself
            callback(TransitionState(gibbs_iter, i, chain.t[i], chain.t[i + 1], ess_trace[-1],
                                     log_w.detach(), zbar0.view(B, N, *lat), do))

    return dict(z0=cur.z.view(B, N, *lat).detach(), log_w=log_w, ess=torch.stack(ess_trace, 1),
                ancestors=torch.stack(ancestors),
                states=torch.stack(states) if keep_states else None)

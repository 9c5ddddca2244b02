"""Auxiliary observations y_t (spec section 2).

A path is a tensor [L, B, *latent], one latent per level; the auxiliary observations a
tensor [L-1, B, *y] for the chain's levels m < L-1 (t > 0; `smc.levels.Chain`): the last
level carries the real y_0.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .optimise import pixel_pseudo_inverse
from .schedule import ddim_eta1_coeffs


@torch.no_grad()
def heuristic_zhat0(model, operator: Callable, y0: torch.Tensor, draws, cfg, device,
                    emit) -> torch.Tensor:
    """zhat0 = E(x_hat), x_hat = argmin_x MSE(y0, A(x)) started at D(z), z ~ N(0, I).

    y0 [B, ...] -> zhat0 [B, *latent_shape]. `draws`: a `smc.draws.DrawSource`;
    `emit(event, **values)`: the trace hook of `ld_smc_sample`.
    """
    dtype = model.alphas_cumprod.dtype
    z = draws.randn("x_hat_init", model.latent_shape, device, dtype)
    x_init = model.decode(z)
    x_hat = pixel_pseudo_inverse(operator, y0, x_init, cfg.xhat_lr, cfg.xhat_max_iters, cfg.xhat_tol,
                                 on_step=lambda it, loss, x: emit("pseudo_inverse_step", it=it, loss=loss))
    zhat0 = model.encode(x_hat)
    emit("pseudo_inverse", z_init=z, x_init=x_init, x_hat=x_hat, zhat0=zhat0)
    return zhat0


@torch.no_grad()
def heuristic_path(zhat0: torch.Tensor, path_a: Sequence[int], abar: torch.Tensor, draws) -> torch.Tensor:
    """The DDIM (eta = 1) forward-posterior path around zhat0 (section 2, step 3).

    z ~ N(0, I) at abar_{path_a[0]}; then for each next abar index (t -> t'):
    z_t' = sqrt(abar_t') zhat0 + sqrt(1 - abar_t' - sigma^2) (z_t - sqrt(abar_t) zhat0) / sqrt(1 - abar_t)
        + sigma eps. path_a: strictly decreasing abar indices (`Chain.path_a`).
    Returns [len(path_a), B, *latent].
    """
    z = draws.randn("path", zhat0.shape[1:], zhat0.device, zhat0.dtype)
    path = [z]
    for a_from, a_to in zip(path_a[:-1], path_a[1:]):
        a_t, a_n = abar[a_from], abar[a_to]
        sigma, c = ddim_eta1_coeffs(a_t, a_n)
        eps = draws.randn("path", zhat0.shape[1:], zhat0.device, zhat0.dtype)
        z = a_n.sqrt() * zhat0 + c * (z - a_t.sqrt() * zhat0) / (1 - a_t).sqrt() + sigma * eps
        path.append(z)
    return torch.stack(path)


@torch.no_grad()
def observations_from_path(model, operator: Callable, path: torch.Tensor, abar_levels: torch.Tensor,
                           draws, noisy: bool, chunk: int) -> torch.Tensor:
    """y_t = A(D(z_t)) (plus N(0, (1-abar_t) I) noise if `noisy`) for every level of `path`.

    path [L, B, *latent], abar_levels [L] (the abar of the chain level each y_t is for)
    -> [L, B, *y]. The decodes run in chunks of about `chunk`
    latents; each chunk holds whole levels for all B images, laid out image-major so
    that per-image operator state (an inpainting mask) expands correctly.
    """
    L, B = path.shape[:2]
    per_chunk = max(1, chunk // B)
    ys = []
    for l0 in range(0, L, per_chunk):
        block = path[l0:l0 + per_chunk]                        # [l, B, ...]
        l = block.shape[0]
        flat = block.transpose(0, 1).reshape(B * l, *path.shape[2:])   # image-major
        y = operator(model.decode(flat))
        ys.append(y.reshape(B, l, *y.shape[1:]).transpose(0, 1))
    ys = torch.cat(ys)
    if noisy:
        std = (1 - abar_levels).sqrt().to(ys.dtype)
        noise = draws.randn("aux_noise", (L, *ys.shape[2:]), ys.device, ys.dtype).transpose(0, 1)
        ys = ys + std.view(L, *([1] * (ys.dim() - 1))) * noise
    return ys


def selected_path(states: torch.Tensor, ancestors: torch.Tensor, final_index: torch.Tensor):
    """Rebuild each image's selected trajectory by walking ancestor indices back.

    states [K+1, B, N, ...] (level i after its proposal), ancestors [K, B, N] (particle n
    at level i+1 descends from particle ancestors[i, b, n] at level i),
    final_index [B] -> path [K+1, B, ...].
    """
    K = ancestors.shape[0]
    B = states.shape[1]
    rows = torch.arange(B, device=states.device)
    idx = final_index.clone()
    out = [None] * (K + 1)
    out[K] = states[K, rows, idx]
    for i in range(K - 1, -1, -1):
        idx = ancestors[i, rows, idx]
        out[i] = states[i, rows, idx]
    return torch.stack(out)

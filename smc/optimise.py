"""Per-image AdamW optimisations: the pseudo-inverse x_hat (spec section 2, step 1)
and the latent refinement z_opt (spec section 3, "Refinement").

Both minimise the sum over images of per-image MSE losses. AdamW acts element-wise
and the per-image losses do not interact, so each image follows exactly the path it
would follow alone; an image that meets its stopping rule is frozen (its value at
that iteration is kept) while the others go on. AdamW uses torch's defaults
(weight_decay = 0.01), as the reference does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# on_step(it, loss, value): after step `it` (0-based), the per-image loss [B] evaluated
# before that step and the value after it [B, ...] (a trace hook; None in normal use).
OnStep = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]


def _per_image_mse(y0: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """MSE(y0_b, pred_b) for each row: [B, ...] x [B, ...] -> [B]."""
    return (y0 - pred).pow(2).flatten(1).mean(1)


def pixel_pseudo_inverse(operator: Callable, y0: torch.Tensor, x_init: torch.Tensor,
                         lr: float, max_iters: int, tol: float, on_step: OnStep = None) -> torch.Tensor:
    """x_hat = argmin_x MSE(y0, A(x)) per image, from x_init [B, C, H, W].

    Stops image b after the step at which its loss was below tol (reference rule),
    or after max_iters steps. Returns x_hat [B, C, H, W] (detached).
    """
    x = x_init.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=lr)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    out = x.detach().clone()
    y0 = y0.detach()
    for it in range(max_iters):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = _per_image_mse(y0, operator(x))
            loss.sum().backward()
        opt.step()
        live = ~done
        out[live] = x.detach()[live]
        if on_step is not None:
            on_step(it, loss.detach(), out.clone())
        done = done | (loss.detach() < tol)
        if bool(done.all()):
            break
    return out


def latent_refinement(model, operator: Callable, y0: torch.Tensor, z_init: torch.Tensor,
                      lr: float, max_iters: int, patience: int, tol: float,
                      keep: str = "best", on_step: OnStep = None) -> torch.Tensor:
    """z_opt = argmin_z MSE(y0, A(D(z))) per image, from z_init [B, c, h, w].

    Image b stops when its loss is higher than `patience` iterations before, or below
    tol, or after max_iters steps (reference rules). Returned with keep="best": the
    iterate with the lowest loss evaluated so far (z_init included); with keep="last":
    the value after image b's last step, as the reference returns it, which can be worse
    than z_init: with the quantised decoder the loss is piecewise constant and the stop
    fires just after a rise.
    `y0` has one row per row of z_init. Returns z_opt (detached), same shape as z_init.
    """
    z = z_init.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=lr)
    done = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    best, last = z.detach().clone(), z.detach().clone()
    best_loss = torch.full((z.shape[0],), float("inf"), device=z.device)
    history = []
    y0 = y0.detach()
    for it in range(max_iters):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = _per_image_mse(y0, operator(model.decode(z)))
            loss.sum().backward()
        cur = loss.detach()
        better = ~done & (cur < best_loss)                 # loss of the iterate before this step
        best[better] = z.detach()[better]
        best_loss = torch.where(better, cur, best_loss)
        opt.step()
        last[~done] = z.detach()[~done]
        if on_step is not None:
            on_step(it, cur, last.clone())
        history.append(cur)
        stop = cur < tol
        if it >= patience:
            stop = stop | (history[it - patience] < cur)
        done = done | stop
        if bool(done.all()):
            break
    return best if keep == "best" else last

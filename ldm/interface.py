"""The latent-diffusion model protocol, stated once: what a sampler needs from a model.

Every sampler of the project (`smc.ld_smc_sample`, the baselines of
`guided_diffusion.methods`) sees a model only through these members, so the real
FFHQ / ImageNet LDMs (`ldm.LatentDiffusion`), the bundled demo model and the
closed-form Gaussian-mixture model (`smc.closed_form`) are interchangeable:

| member | what it is |
|---|---|
| `eps(z_t, t, cond=None)` | noise prediction eps_theta(z_t, t): z_t [B, *latent_shape], t [B] long -> [B, *latent_shape]; t runs over 0 .. T-1, and t = T once when LD-SMC's `start_at_T` switch (the release's first call, `reference` preset) is on |
| `decode(z)` | D(z): [B, *latent_shape] -> images [B, ...], differentiable in z |
| `encode(x)` | E(x): images -> [B, *latent_shape] (needed by LD-SMC's auxiliary path, PSLD, GML-DPS, ReSample) |
| `alphas_cumprod` | abar_t, a 1-D tensor [T] (t = 0 .. T-1) |
| `latent_shape` | the shape of one latent, e.g. (3, 64, 64) |
| `device` (optional) | where the model runs; without it, the device of `alphas_cumprod` |
"""
from __future__ import annotations

from typing import Iterable

import torch

PROTOCOL = {
    "eps": "eps(z_t, t, cond=None) -> noise prediction [B, *latent_shape]",
    "decode": "decode(z) -> images, differentiable in z",
    "encode": "encode(x) -> latents [B, *latent_shape]",
    "alphas_cumprod": "alphas_cumprod: 1-D tensor [T] of abar_t",
    "latent_shape": "latent_shape: tuple, the shape of one latent",
}
REQUIRED = tuple(PROTOCOL)


class ModelProtocolError(TypeError):
    """A model lacks a member of the latent-diffusion protocol; the message names it."""


def check_model(model, needs: Iterable[str] = REQUIRED, who: str = "the sampler") -> None:
    """Raise ModelProtocolError naming every member of `needs` that `model` lacks."""
    missing = [name for name in needs if not hasattr(model, name)]
    if missing:
        wanted = "; ".join(PROTOCOL.get(name, name) for name in missing)
        raise ModelProtocolError(
            f"{type(model).__name__} lacks {', '.join(repr(m) for m in missing)}, which {who} needs "
            f"({wanted}); the model protocol is listed in ldm/interface.py")
    abar = getattr(model, "alphas_cumprod", None)
    if "alphas_cumprod" in needs and not (torch.is_tensor(abar) and abar.dim() == 1):
        raise ModelProtocolError(f"{type(model).__name__}.alphas_cumprod must be a 1-D tensor [T], "
                                 f"got {type(abar).__name__}")


def model_device(model) -> torch.device:
    """`model.device` where the model has it, else the device of `model.alphas_cumprod`."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    return model.alphas_cumprod.device

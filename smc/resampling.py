"""Resampling schemes, ESS and per-image random generators.

All schemes work on one image's normalised log-weights [N] with that image's
generator, and return ancestor indices [N] whose expected offspring counts are N w_i
(unbiased). `resample` applies a scheme to a batch [B, N], image by image.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator]]


def per_image_generators(generator: Optional[Generators], batch_size: int,
                         device: torch.device) -> List[torch.Generator]:
    """One torch.Generator per image.

    A list of B generators is used as given. One generator is split into B children
    seeded from B draws of it (child i depends only on the parent and on i). None
    gives B fresh generators seeded from torch's default seed sequence.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images: "
                             "pass one generator, or exactly one per image")
        wrong = [i for i, g in enumerate(generator) if g.device.type != torch.device(device).type]
        if wrong:
            raise ValueError(f"generator {wrong[0]} is on {generator[wrong[0]].device} but the model runs on "
                             f"{device}: make the per-image generators with torch.Generator(device={str(device)!r})")
        return list(generator)
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.seed()
    seeds = torch.randint(0, 2 ** 62, (batch_size,), generator=generator,
                          device=generator.device).tolist()
    gens = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(seed))
        gens.append(g)
    return gens


def randn_per_image(gens: Sequence[torch.Generator], shape, device, dtype=torch.float32):
    """Standard normal draws [B, *shape], row b drawn from gens[b]."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device, dtype=dtype)
                        for g in gens])


def normalise_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """log w_i - logsumexp_j log w_j along the last dim ([B, N] -> [B, N]).

    Shifted by the maximum first: with large log-weights (float32 values ~1e2-1e6) the
    logsumexp itself carries an error of ulp(|log w|); the shifted values avoid it.
    """
    shifted = log_w - log_w.max(dim=-1, keepdim=True).values
    return shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size 1 / sum_i w_i^2 of normalised weights; [B, N] -> [B]."""
    log_w = normalise_log_weights(log_w)
    return torch.exp(-torch.logsumexp(2 * log_w, dim=-1))


def _uniforms_to_indices(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    idx = torch.searchsorted(cdf, u, right=True)
    return idx.clamp_max(cdf.numel() - 1)


def multinomial(log_w: torch.Tensor, generator: torch.Generator, n: Optional[int] = None):
    """N i.i.d. draws from Categorical(w); [N] -> [n] LongTensor."""
    w = torch.exp(normalise_log_weights(log_w.double()))
    n = w.numel() if n is None else n
    return torch.multinomial(w, n, replacement=True, generator=generator)


def systematic(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniform u ~ U[0, 1/N); indices of the cdf at u + i/N, i = 0..N-1."""
    w = torch.exp(normalise_log_weights(log_w.double()))
    n = w.numel()
    u0 = torch.rand((), generator=generator, device=w.device, dtype=w.dtype)
    u = (u0 + torch.arange(n, device=w.device, dtype=w.dtype)) / n
    return _uniforms_to_indices(torch.cumsum(w, 0), u)


def residual(log_w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """floor(N w_i) copies of particle i, the remaining R draws multinomial on the residuals."""
    w = torch.exp(normalise_log_weights(log_w.double()))
    n = w.numel()
    counts = torch.floor(n * w + 1e-9).long()   # tolerance: exp(log w) rounds 2.0 to 1.999...
    rest = n - int(counts.sum())
    idx = torch.repeat_interleave(torch.arange(n, device=w.device), counts)
    if rest > 0:
        r = (n * w - counts).clamp_min(0)
        extra = torch.multinomial(r / r.sum(), rest, replacement=True, generator=generator)
        idx = torch.cat([idx, extra])
    return idx


SCHEMES: Dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "multinomial": multinomial, "systematic": systematic, "residual": residual}


def resample(log_w: torch.Tensor, gens: Sequence[torch.Generator], scheme: str) -> torch.Tensor:
    """Ancestor indices [B, N] (row b from image b's weights and generator)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling {scheme!r}: choose one of {sorted(SCHEMES)}")
    fn = SCHEMES[scheme]
    return torch.stack([fn(log_w[b], gens[b]).to(log_w.device) for b in range(log_w.shape[0])])

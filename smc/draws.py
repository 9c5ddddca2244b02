"""Where the sampler's random numbers come from.

`GeneratorDraws` (the default) answers every draw from one torch.Generator per image, so an
image's result does not depend on its batch. A `DrawSource` subclass can answer them from
elsewhere: `scripts/check_release_replay.py` answers them from a recording of the authors'
released sampler. Each draw names its kind, in the order the sampler makes them:

| kind | shape per image | where |
|---|---|---|
| `"x_hat_init"` | latent | the latent z whose decoding D(z) starts the pseudo-inverse (section 2, step 1) |
| `"path"` | latent | z_T of the heuristic path, then the noise of each of its steps (section 2, step 3) |
| `"aux_noise"` | [L, *y] | noise of the noisy y_t (`noisy_aux_obs`), all levels at once |
| `"particles"` | [N, *latent] | z_T of the N particles (section 3, Start) |
| `"proposal"` | [N, *latent] | eps of z_t = m + sigma eps (section 3, step 2) |
| resample | [N] indices | ancestors (section 3, step 1), only for the images that resample |
| categorical | one index | `select="sample"` (section 3, End) |
"""
from __future__ import annotations

from typing import Sequence

import torch

from .resampling import randn_per_image, resample


class DrawSource:
    """Every random draw of LD-SMC, by kind (see the module docstring). Subclass to inject draws."""

    def randn(self, kind: str, shape, device, dtype) -> torch.Tensor:
        """Standard normal draws [B, *shape] (row b for image b)."""
        raise NotImplementedError

    def resample(self, log_w: torch.Tensor, rows: Sequence[int], scheme: str) -> torch.Tensor:
        """Ancestor indices [len(rows), N] from normalised log-weights [len(rows), N] of images `rows`."""
        raise NotImplementedError

    def categorical(self, log_w: torch.Tensor) -> torch.Tensor:
        """One index per image [B] drawn from normalised log-weights [B, N]."""
        raise NotImplementedError


class GeneratorDraws(DrawSource):
    """Draws from one torch.Generator per image (`resampling.per_image_generators`)."""

    def __init__(self, gens: Sequence[torch.Generator]):
        self.gens = list(gens)

    def randn(self, kind, shape, device, dtype):
        return randn_per_image(self.gens, shape, device, dtype)

    def resample(self, log_w, rows, scheme):
        return resample(log_w, [self.gens[b] for b in rows], scheme)

    def categorical(self, log_w):
        return torch.stack([torch.multinomial(log_w[b].exp().double(), 1, generator=g)[0]
                            for b, g in enumerate(self.gens)]).to(log_w.device)

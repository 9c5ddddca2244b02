"""A counting proxy around a latent-diffusion model: UNet (eps) and decoder calls.

`CountingModel(model)` behaves like `model` (every other attribute is forwarded) and
counts, in `counts`, the forward calls of `eps` and `decode`, the backward passes
through them (a hook on the output fires when a gradient flows back) and the rows
(latents) each processed. Used by `scripts/bench_smc.py` and the call-count tests.
"""
from __future__ import annotations

from collections import Counter

import torch


class CountingModel:
    """Proxy that counts eps/decode forward and backward calls of a wrapped model."""

    def __init__(self, model):
        self._model = model
        self.counts = Counter()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _count(self, kind: str, out: torch.Tensor, rows: int) -> torch.Tensor:
        self.counts[f"{kind}_fwd"] += 1
        self.counts[f"{kind}_fwd_rows"] += rows
        if out.requires_grad:
            def hook(grad):
                self.counts[f"{kind}_bwd"] += 1
                return grad
            out.register_hook(hook)
        return out

    def eps(self, z, t, cond=None):
        return self._count("unet", self._model.eps(z, t, cond), z.shape[0])

    def decode(self, z, *args, **kwargs):
        return self._count("decoder", self._model.decode(z, *args, **kwargs), z.shape[0])

    def snapshot(self) -> Counter:
        """A copy of the counts now (subtract two snapshots to count a stretch)."""
        return Counter(self.counts)

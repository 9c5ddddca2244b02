"""The chain's levels (spec section 1) and the release's indexing (docs/sampler.md, "Switches").

Level m of the chain has a UNet timestep `t[m]` and an abar index `a[m]`; transition m goes
from level m to level m+1 with the DDIM (eta = 1) step that leaves abar_{a[m]} for the next
lower abar of the schedule ts = [t_0 = T-1 > t_1 > ... > t_K = 0].

- `start_at_T` off: t = a = ts (K transitions).
- `start_at_T` on (the release): a first level at UNet t = T, one past the trained range,
  reuses abar_{t_0}: t = [T, t_0, ..., t_K], a = [t_0, t_0, t_1, ..., t_K] (K + 1
  transitions), so transitions 0 and 1 both step abar_{t_0} -> abar_{t_1}.

The auxiliary observations of Gibbs iteration 0 come from the heuristic path, drawn along ts
(one latent per entry of ts). Level m (m < L-1) is paired with path level `aux[m]`:
- `aux_by_position` (the release): aux[m] = m. With `start_at_T`, every level after the first
  then meets the heuristic latent one level below its own abar.
- otherwise: the path level at the level's own abar, aux[m] = ts.index(a[m]).
Without `start_at_T` the two rules coincide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .schedule import ddim_eta1_coeffs, strided_timesteps


@dataclass(frozen=True)
class Chain:
    """UNet timesteps, abar indices and auxiliary pairing of the chain's L levels."""
    ts: List[int]    # [K+1] the schedule t_0 = T-1 > ... > t_K = 0 (the heuristic path walks it)
    t: List[int]     # [L] UNet timestep of level m
    a: List[int]     # [L] abar index of level m
    aux: List[int]   # [L-1] heuristic-path level paired with level m in Gibbs iteration 0

    @property
    def num_levels(self) -> int:
        return len(self.t)

    @property
    def num_transitions(self) -> int:
        return len(self.t) - 1

    @property
    def num_path_levels(self) -> int:
        """How many heuristic-path latents the pairing needs (levels 0 .. max(aux))."""
        return max(self.aux) + 1

    def step_coeffs(self, abar: torch.Tensor):
        """Per level m: (sqrt(abar_next), c_eps, sigma) of the DDIM (eta = 1) step leaving m.

        mu_theta(z) = sqrt(abar_next) zbar0 + c_eps eps_theta(z), sigma its std. The last
        level (t = 0) has no step of its own; it gets the release's step to abar = 1
        (mu = zbar0) with the sigma of the step before (used only by `log_prior_new_moments`).
        Returns three lists of 0-dim tensors, length L.
        """
        nxt = dict(zip(self.ts[:-1], self.ts[1:]))
        out = []
        for m in range(self.num_levels - 1):
            a_t, a_n = abar[self.a[m]], abar[nxt[self.a[m]]]
            sigma, c_eps = ddim_eta1_coeffs(a_t, a_n)
            out.append((a_n.sqrt(), c_eps, sigma))
        one = torch.ones((), dtype=abar.dtype, device=abar.device)
        out.append((one, torch.zeros_like(one), out[-1][2]))
        return [list(v) for v in zip(*out)]


def make_chain(num_steps: int, num_train_steps: int, start_at_T: bool, aux_by_position: bool) -> Chain:
    """The chain of `num_steps` schedule entries (see the module docstring)."""
    ts = strided_timesteps(num_steps, num_train_steps).tolist()
    t, a = (([num_train_steps] + ts, [ts[0]] + ts) if start_at_T else (list(ts), list(ts)))
    L = len(t)
    aux = list(range(L - 1)) if aux_by_position else [ts.index(a[m]) for m in range(L - 1)]
    return Chain(ts=ts, t=t, a=a, aux=aux)


def num_transitions(cfg, num_train_steps: int = 1000) -> int:
    """Transitions (callback calls) per Gibbs iteration for a config (resolved or not)."""
    cfg = cfg.resolve()
    return make_chain(cfg.num_steps, num_train_steps, cfg.start_at_T, cfg.aux_by_position).num_transitions

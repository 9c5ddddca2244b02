"""The chain's levels (spec section 1) and the release's indexing (docs/sampler.md, "Switches").

Level m of the chain has a UNet timestep `t[m]` and an abar index `a[m]`; transition m goes
from level m to level m+1 with the DDIM (eta = 1) step abar_{a[m]} -> abar_{a_next[m]}.
The schedule is ts = [t_0 = T-1 > t_1 > ... > t_K = 0].

The release's three index slips are each one *model* step off. On a strided schedule the
switches keep them one model step off (the size they have in the release's full chain),
rather than one strided level; on the full chain both readings are the same.

- `start_at_T` off: t = a = ts, a_next[m] = a[m+1] (K transitions).
- `start_at_T` on (the release): a first level at UNet t = T, one past the trained range,
  with abar_{t_0}: t = [T, t_0, ..., t_K], a = [t_0, t_0, t_1, ..., t_K] (K + 1
  transitions). Its step goes one model step down, abar_{t_0} -> abar_{t_0 - 1}; the next
  level is labelled t_0 again, so the first two transitions share abar_{t_0}.
- The auxiliary observations of Gibbs iteration 0 come from the heuristic path, a DDIM
  forward path around zhat0 through the abar indices `path_a`; level m (m < L-1) is
  paired with path level `aux[m]`.
  `aux_one_step_below` (the release): level 0 with its own abar, every later level m with
  abar_{a[m] - 1}, one model step below its own. Off: every level with its own abar.
- `log_prior_new_moments` (the release) evaluates log p(z_t | z_t+1) with the moments of
  the one-model-step DDIM kernel leaving z_t's own level, abar_{a} -> abar_{a-1}
  (`prior_coeffs`); at t = 0 that step goes to abar = 1 (mean zbar0(z_0)) and, since its
  sigma is 0, borrows the sigma of abar_1 -> abar_0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .schedule import ddim_eta1_coeffs, strided_timesteps


@dataclass(frozen=True)
class Chain:
    """UNet timesteps, abar indices, proposal steps and auxiliary pairing of the chain's L levels."""
    ts: List[int]       # [K+1] the schedule t_0 = T-1 > ... > t_K = 0
    t: List[int]        # [L] UNet timestep of level m
    a: List[int]        # [L] abar index of level m
    a_next: List[int]   # [L-1] abar index the step leaving level m goes to
    path_a: List[int]   # abar indices of the heuristic path's levels (strictly decreasing)
    aux: List[int]      # [L-1] heuristic-path level paired with level m in Gibbs iteration 0

    @property
    def num_levels(self) -> int:
        return len(self.t)

    @property
    def num_transitions(self) -> int:
        return len(self.t) - 1

    def step_coeffs(self, abar: torch.Tensor):
        """Per transition m: (sqrt(abar_next), c_eps, sigma) of its DDIM (eta = 1) step.

        mu_theta(z) = sqrt(abar_next) zbar0 + c_eps eps_theta(z); sigma is the step's std.
        Returns three lists of 0-dim tensors, length L-1.
        """
        return _coeffs([(abar[a], abar[n]) for a, n in zip(self.a, self.a_next)])

    def prior_coeffs(self, abar: torch.Tensor):
        """Per level m: the one-model-step kernel abar_{a[m]} -> abar_{a[m]-1} (t = 0: -> 1,
        sigma borrowed from abar_1 -> abar_0), as `step_coeffs`; for `log_prior_new_moments`."""
        one = torch.ones((), dtype=abar.dtype, device=abar.device)
        out = _coeffs([(abar[a], abar[a - 1]) if a > 0 else (abar[1], abar[0]) for a in self.a])
        for m, a in enumerate(self.a):
            if a == 0:   # the release's step from t = 0 to abar = 1: mean zbar0, the sigma before
                out[0][m], out[1][m] = one, torch.zeros_like(one)
        return out


def _coeffs(pairs):
    rows = []
    for a_t, a_n in pairs:
        sigma, c_eps = ddim_eta1_coeffs(a_t, a_n)
        rows.append((a_n.sqrt(), c_eps, sigma))
    return [list(v) for v in zip(*rows)]


def make_chain(num_steps: int, num_train_steps: int, start_at_T: bool, aux_one_step_below: bool) -> Chain:
    """The chain of `num_steps` schedule entries (see the module docstring)."""
    ts = strided_timesteps(num_steps, num_train_steps).tolist()
    if start_at_T:
        t, a = [num_train_steps] + ts, [ts[0]] + ts
        a_next = [ts[0] - 1] + ts[1:]
    else:
        t, a, a_next = list(ts), list(ts), ts[1:]
    L = len(t)
    if aux_one_step_below:
        path_a = [a[0]] + [a[m] - 1 for m in range(1, L - 1)]
        aux = list(range(L - 1))
    else:
        path_a = sorted(set(a[:L - 1]), reverse=True)
        aux = [path_a.index(a[m]) for m in range(L - 1)]
    return Chain(ts=ts, t=t, a=a, a_next=a_next, path_a=path_a, aux=aux)


def num_transitions(cfg, num_train_steps: int = 1000) -> int:
    """Transitions (callback calls) per Gibbs iteration for a config (resolved or not)."""
    cfg = cfg.resolve()
    return make_chain(cfg.num_steps, num_train_steps, cfg.start_at_T, cfg.aux_one_step_below).num_transitions

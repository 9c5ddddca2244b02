"""LD-SMC configuration: one dataclass, two named presets (spec section 4).

The preset (`"reference"` or `"exact"`) only fills the switches that were left at
`PRESET`; any switch set explicitly wins. `LDSMCConfig.resolve()` returns the config
that actually runs, with every switch filled in, and it is what the result records.
`reference` turns on every behaviour of the authors' release that changes results
(checked step by step against a recording of it: scripts/check_release_replay.py);
`exact` turns them off. docs/sampler.md explains each switch.

| switch                 | reference    | exact  |
|------------------------|--------------|--------|
| log_density            | "mean"       | "sum"  |
| noisy_aux_obs          | False        | True   |
| final_std_sigma_y      | False        | True   |
| twist_var_sigma_y      | False        | True   |
| ess_threshold          | None (every step but the first) | 0.5 |
| start_at_T             | True         | False  |
| aux_one_step_below        | True         | False  |
| log_prior_new_moments  | True         | False  |
| refine_return          | "last"       | "best" |
| refine_each_gibbs      | True         | False  |
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

PRESET = "preset"  # sentinel: "take this switch from the preset"

PRESETS = {
    "reference": dict(log_density="mean", noisy_aux_obs=False, final_std_sigma_y=False,
                      twist_var_sigma_y=False, ess_threshold=None, start_at_T=True,
                      aux_one_step_below=True, log_prior_new_moments=True, refine_return="last",
                      refine_each_gibbs=True),
    "exact": dict(log_density="sum", noisy_aux_obs=True, final_std_sigma_y=True,
                  twist_var_sigma_y=True, ess_threshold=0.5, start_at_T=False,
                  aux_one_step_below=False, log_prior_new_moments=False, refine_return="best",
                  refine_each_gibbs=False),
}
BOOL_SWITCHES = ("noisy_aux_obs", "final_std_sigma_y", "twist_var_sigma_y", "start_at_T",
                 "aux_one_step_below", "log_prior_new_moments", "refine_each_gibbs")
FLOATS = ("kappa1", "kappa2", "rho", "sigma_y", "xhat_lr", "xhat_tol", "refine_lr", "refine_tol")
INTS = ("num_particles", "s", "num_gibbs_iters", "num_steps", "xhat_max_iters", "refine_max_iters",
        "refine_patience", "decode_chunk")
RESAMPLING = ("multinomial", "systematic", "residual")
SELECT = ("max_weight", "sample", "all")
LOG_DENSITY = ("mean", "sum")
REFINE_RETURN = ("best", "last")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LDSMCConfig:
    """Every knob of the LD-SMC sampler (defaults: the authors' code, spec sections 2-4).

    num_particles: N particles per image.
    preset: "reference" (reproduces the released code) or "exact" (section 4 table).
    kappa1, kappa2, rho, s: proposal guidance, g = kappa2((1-rho) g1 + rho g2) if t <= s
        else kappa1 g1 (section 3, step 2).
    num_gibbs_iters: J; iteration 0 builds y_t from the heuristic path, j >= 1 from the
        particle selected at the end of iteration j-1.
    num_steps: length of the decreasing timestep list 999 -> 0 (1000 = full chain);
        the chain makes num_steps - 1 transitions (one more with start_at_T).
    aux_observations: False gives latent TDS (no l(y_t | z_t), g = kappa1 g1 always).
    resampling: "multinomial" | "systematic" | "residual".
    select: "max_weight" | "sample" | "all" (x0 is then [B, N, C, H, W]).
    refine: run the latent refinement z_opt = argmin_z MSE(y0, A(D(z))) from z_0.
    sigma_y: measurement noise std (used by the exact preset's likelihoods).
    xhat_lr, xhat_max_iters, xhat_tol: pseudo-inverse x_hat (section 2, step 1).
    refine_lr, refine_max_iters, refine_patience, refine_tol: refinement (section 3, end).
    decode_chunk: how many latents the auxiliary-path decodes batch together.
    aux_device: where the auxiliary observations y_t ([steps, B, *y]) are kept; None = the
        model's device. "cpu" frees ~0.8 GB of GPU memory per 256x256 image over 1000
        steps, for one small host-to-device copy per transition; results are unchanged.

    Preset switches (PRESET = take it from the preset; each line: what it does, and why the
    reference turns it on / the exact preset off):
    ess_threshold: None resamples at every transition but the first (the release);
        a float c in (0, 1] resamples when ESS < c N (resampling every step collapses ancestry).
    log_density: "mean" (per-dimension mean of -(x-m)^2/(2 s^2): the release tempers every
        term by 1/dim) or "sum" (the full Gaussian log-density the SMC theory needs).
    noisy_aux_obs: y_t ~ N(A(D(z_t)), (1-abar_t) I) (the Gibbs chain's model) instead of the
        release's noiseless y_t = A(D(z_t)).
    final_std_sigma_y: likelihood of y_0 at t = 0 has std sigma_y (the real noise; the
        release uses sqrt(1-abar_0)).
    twist_var_sigma_y: twisting variance 1 - abar_t + sigma_y^2 (tends to the real
        likelihood; the release: 1 - abar_t).
    start_at_T: the chain starts one level above t_0, at UNet t = T (outside the trained
        range) with abar_{t_0}, and steps one model step down from there, so its first two
        transitions share abar_{t_0} (the release's indexing); off: z_T at t_0 = T-1.
    aux_one_step_below: in Gibbs iteration 0 every level after the first meets the heuristic
        latent one model step below its own abar (the release's pairing); off: the heuristic
        latent at the level's own abar.
    log_prior_new_moments: log p(z_t | z_t+1) evaluated with the moments computed at the new
        z_t, those of its one-model-step DDIM kernel (the release's indexing slip; at t = 0
        mean zbar0(z_0) and the sigma of abar_1 -> abar_0); off: N(mu_theta(z_t+1), sigma^2)
        of the step that proposed z_t (the spec).
    (The three are one model step off, as in the release's full chain, on any schedule:
    smc/levels.py.)
    refine_return: "last" (the value after the refinement's last step, as the release
        returns it) or "best" (the iterate with the lowest evaluated loss, z_0 included:
        never worse than z_0).
    refine_each_gibbs: refine after every Gibbs iteration (the release's x0_opt[j], in
        `x0_refined_per_gibbs`); off: once, after the last (the only one that is returned).
    """

    num_particles: int = 1
    preset: str = "reference"
    kappa1: float = 1.0
    kappa2: float = 2.5
    rho: float = 0.75
    s: int = 333
    num_gibbs_iters: int = 1
    num_steps: int = 1000
    aux_observations: bool = True
    resampling: str = "multinomial"
    ess_threshold: Union[Optional[float], str] = PRESET
    select: str = "max_weight"
    refine: bool = True
    sigma_y: float = 0.01
    log_density: str = PRESET
    noisy_aux_obs: Union[bool, str] = PRESET
    final_std_sigma_y: Union[bool, str] = PRESET
    twist_var_sigma_y: Union[bool, str] = PRESET
    start_at_T: Union[bool, str] = PRESET
    aux_one_step_below: Union[bool, str] = PRESET
    log_prior_new_moments: Union[bool, str] = PRESET
    xhat_lr: float = 5e-3
    xhat_max_iters: int = 5000
    xhat_tol: float = 1e-10
    refine_lr: float = 5e-3
    refine_max_iters: int = 500
    refine_patience: int = 200
    refine_tol: float = 1e-10
    refine_return: str = PRESET
    refine_each_gibbs: Union[bool, str] = PRESET
    decode_chunk: int = 16
    aux_device: Optional[str] = None
    extra: dict = field(default_factory=dict)  # free-form notes carried into the result

    def resolve(self) -> "LDSMCConfig":
        """Return a validated copy with every preset switch filled in."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {sorted(PRESETS)}")
        values = dataclasses.asdict(self)
        for key, default in PRESETS[self.preset].items():
            if isinstance(values[key], str) and values[key] == PRESET:
                values[key] = default
        cfg = LDSMCConfig(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        # Types first: every comparison below then has numbers to compare.
        for name in FLOATS:
            value = getattr(self, name)
            need(_is_number(value), f"{name} must be a finite number, got {value!r}")
        for name in INTS:
            value = getattr(self, name)
            need(isinstance(value, numbers.Integral) and not isinstance(value, bool),
                 f"{name} must be an int, got {value!r}")
        for name in BOOL_SWITCHES + ("aux_observations", "refine"):
            need(isinstance(getattr(self, name), bool),
                 f"{name} must be True, False or left to the preset, got {getattr(self, name)!r}")
        need(self.num_particles >= 1, f"num_particles must be an int >= 1, got {self.num_particles!r}")
        need(self.resampling in RESAMPLING,
             f"unknown resampling {self.resampling!r}: choose one of {RESAMPLING}")
        need(self.select in SELECT, f"unknown select {self.select!r}: choose one of {SELECT}")
        need(self.log_density in LOG_DENSITY,
             f"unknown log_density {self.log_density!r}: choose one of {LOG_DENSITY}")
        for name in ("kappa1", "kappa2"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        need(0.0 <= self.rho <= 1.0, f"rho must lie in [0, 1], got {self.rho!r}")
        need(self.s >= 0, f"s must be an int >= 0 (the timestep below which g2 guides), got {self.s!r}")
        need(2 <= self.num_steps <= 1000,
             f"num_steps must be an int in [2, 1000] (timesteps 999 -> 0), got {self.num_steps!r}")
        need(self.num_gibbs_iters >= 1, f"num_gibbs_iters must be an int >= 1, got {self.num_gibbs_iters!r}")
        need(self.ess_threshold is None or (_is_number(self.ess_threshold) and 0.0 < self.ess_threshold <= 1.0),
             f"ess_threshold must be None (resample every step) or a float in (0, 1], "
             f"got {self.ess_threshold!r}")
        need(self.aux_observations or self.num_gibbs_iters == 1,
             "num_gibbs_iters > 1 needs aux_observations=True (Gibbs iterations redraw y_t; "
             "latent TDS has none)")
        need(self.sigma_y > 0, f"sigma_y must be > 0, got {self.sigma_y!r}")
        for name in ("xhat_lr", "refine_lr"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("xhat_tol", "refine_tol"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        need(self.refine_return in REFINE_RETURN,
             f"refine_return must be 'best' or 'last', got {self.refine_return!r}")
        if self.aux_device is not None:
            try:
                torch.device(self.aux_device)
            except (RuntimeError, TypeError):
                raise ValueError(f"aux_device must be None or a torch device such as 'cpu', "
                                 f"got {self.aux_device!r}") from None
        need(self.decode_chunk >= 1, f"decode_chunk must be >= 1, got {self.decode_chunk}")
        need(self.refine_patience >= 1 and self.refine_max_iters >= 0 and self.xhat_max_iters >= 0,
             "refine_patience must be >= 1 and the iteration limits >= 0")

"""Noise schedules of the CompVis DDPM/LDM: small pure functions, float64 numpy-free."""
import torch


def linear_beta_schedule(timesteps: int = 1000, linear_start: float = 0.0015,
                         linear_end: float = 0.0195) -> torch.Tensor:
    """The LDM "linear" schedule: beta_t = (sqrt(start) + t/(T-1) (sqrt(end) - sqrt(start)))^2.

    Returns float64 betas [T].
    """
    if timesteps < 2:
        raise ValueError(f"timesteps must be at least 2, got {timesteps}")
    if not 0 < linear_start < linear_end < 1:
        raise ValueError(f"need 0 < linear_start < linear_end < 1, got {linear_start}, {linear_end}")
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s); same shape and dtype as betas."""
    return torch.cumprod(1.0 - betas, dim=0)


def compvis_schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The 1-D buffers a CompVis DDPM registers from its betas (float64, v_posterior = 0).

    Used to check the schedule stored in a checkpoint against the config.
    """
    alphas = 1.0 - betas
    ac = alphas_cumprod_from_betas(betas)
    ac_prev = torch.cat([torch.ones(1, dtype=betas.dtype), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }

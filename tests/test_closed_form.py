"""The closed-form Gaussian-mixture model: exact eps, exact posterior, SW metric."""
import math

import torch

from ldm_compact import single_thread  # noqa: F401 (autouse: one thread is faster for tiny tensors)
from smc.closed_form import GaussianMixtureLDM, make_toy_problem, sliced_wasserstein


def test_eps_is_scaled_score_of_noised_mixture():
    model, _, _, _ = make_toy_problem(seed=3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    score, = torch.autograd.grad(model.log_prob_t(z, t).sum(), z)
    expect = -(1 - model.alphas_cumprod[t]).sqrt()[:, None] * score
    assert torch.allclose(model.eps(z, t), expect, atol=1e-12)


def test_noised_marginal_matches_forward_process():
    # log p_t must be the density of sqrt(abar_t) z0 + sqrt(1 - abar_t) n: compare its
    # mean/second moment with Monte Carlo draws of the forward process.
    model, _, _, _ = make_toy_problem(seed=4, d=2, m=2, p=1)
    g = torch.Generator().manual_seed(1)
    t = 300
    a = model.alphas_cumprod[t]
    zt = a.sqrt() * model.sample_prior(200000, g) + (1 - a).sqrt() * torch.randn(200000, 2, generator=g,
                                                                                dtype=torch.float64)
    grid = torch.linspace(-8, 8, 321, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    dens = model.log_prob_t(pts, torch.full((pts.shape[0],), t)).exp()
    cell = (grid[1] - grid[0]) ** 2
    assert abs(float(dens.sum() * cell) - 1) < 1e-3
    mean = (pts * dens[:, None]).sum(0) * cell
    assert torch.allclose(mean, zt.mean(0), atol=0.03)


def test_posterior_matches_importance_sampling_from_prior():
    model, op, y0, _ = make_toy_problem(seed=5, sigma_y=0.5)
    g = torch.Generator().manual_seed(2)
    prior = model.sample_prior(400000, g)
    log_lik = -0.5 * (y0 - op(model.decode(prior))).pow(2).sum(1) / 0.25
    w = torch.softmax(log_lik, 0)
    is_mean = (w[:, None] * prior).sum(0)
    is_m2 = (w[:, None] * prior ** 2).sum(0)
    post = model.sample_posterior(op.A, y0, 0.5, 200000, g)
    assert torch.allclose(post.mean(0), is_mean, atol=0.05)
    assert torch.allclose((post ** 2).mean(0), is_m2, atol=0.1)


def test_encode_inverts_decode():
    model, _, _, _ = make_toy_problem(d=3, m=5, p=2)
    z = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(model.encode(model.decode(z)), z, atol=1e-12)


def test_sliced_wasserstein_zero_and_shift():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(a, a.clone(), 200, g) == 0.0
    v = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    # a shift v moves each projection by theta.v: SW_2 = |v| / sqrt(d) in expectation
    sw = sliced_wasserstein(a, a + v, 4000, g)
    assert abs(sw - 2.0 / math.sqrt(4)) < 0.03


def test_model_rejects_bad_shapes():
    import pytest
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixtureLDM(torch.zeros(3), 1.0, torch.ones(3), torch.eye(3))
    with pytest.raises(ValueError, match="W must be"):
        GaussianMixtureLDM(torch.zeros(2, 3), 1.0, torch.ones(2), torch.eye(2))

"""Noise models: sampling from explicit generators and closed-form log-likelihoods."""
import math

import pytest
import scipy.stats
import torch

from guided_diffusion.measurements import NOISES, get_noise


def _Ax(batch=3, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1


def test_registry_names_and_errors():
    assert set(NOISES) == {"clean", "gaussian", "poisson"}
    with pytest.raises(NameError, match="gaussian"):
        get_noise("normal", sigma=0.1)
    with pytest.raises(TypeError, match="sigma"):
        get_noise("gaussian", std=0.1)
    with pytest.raises(ValueError, match="sigma > 0"):
        get_noise("gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        get_noise("gaussian", sigma=0.1)(_Ax())


def test_gaussian_log_likelihood_matches_torch_distributions():
    noise = get_noise("gaussian", sigma=0.05)
    assert noise.sigma == 0.05
    Ax = _Ax()
    y = noise(Ax, generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Normal(Ax, 0.05).log_prob(y).flatten(1).sum(1)
    torch.testing.assert_close(noise.log_likelihood(y, Ax), expected)


def test_gaussian_samples_have_the_right_spread_and_follow_the_generator():
    noise = get_noise("gaussian", sigma=0.1)
    Ax = torch.zeros(4, 3, 64, 64)
    y = noise(Ax, generator=torch.Generator().manual_seed(2))
    assert abs(y.std().item() - 0.1) < 0.003 and abs(y.mean().item()) < 0.003
    torch.testing.assert_close(y, noise(Ax, generator=torch.Generator().manual_seed(2)))
    # One generator per image: row i does not depend on the rest of the batch.
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    y_list = noise(Ax, generator=gens())
    for i in range(4):
        torch.testing.assert_close(y_list[i:i + 1], noise(Ax[i:i + 1], generator=gens()[i]))
    with pytest.raises(ValueError, match="one per row"):
        noise(Ax, generator=gens()[:2])


def test_per_image_y_broadcasts_over_particles():
    noise = get_noise("gaussian", sigma=0.2)
    Ax = _Ax(batch=6)
    y = _Ax(batch=2, seed=5)
    ll = noise.log_likelihood(y, Ax)
    torch.testing.assert_close(ll, noise.log_likelihood(y.repeat_interleave(3, 0), Ax))
    with pytest.raises(ValueError, match="multiple"):
        noise.log_likelihood(_Ax(batch=4), Ax)


def test_poisson_samples_follow_dps_semantics():
    noise = get_noise("poisson", rate=1.0)
    Ax = torch.full((2, 3, 64, 64), -0.5)  # intensity 255 * 0.25
    y = noise(Ax, generator=torch.Generator().manual_seed(3))
    counts = (y + 1) / 2 * 255
    torch.testing.assert_close(counts, counts.round(), atol=1e-3, rtol=0)  # on the count lattice
    assert abs(counts.mean().item() - 63.75) < 0.3
    assert abs(counts.var().item() - 63.75) < 3.0  # Poisson: variance = mean
    assert y.min() >= -1 and y.max() <= 1


def test_poisson_log_likelihood_matches_scipy_including_clipped_pixels():
    noise = get_noise("poisson", rate=0.1)  # c = 25.5 counts at full intensity
    Ax = _Ax(batch=2, size=5, seed=4)
    y = noise(Ax, generator=torch.Generator().manual_seed(4))
    y[0, 0, 0, :3] = 1.0  # force some clipped pixels
    Ax[0, 0, 0, 0] = 0.99
    lam = (25.5 * ((Ax + 1) / 2).clamp(0, 1)).numpy()
    k = torch.round((y + 1) * 25.5 / 2).numpy()
    top = (y >= 1).numpy()
    logp = scipy.stats.poisson.logpmf(k, lam)
    logp[top] = scipy.stats.poisson.logsf(math.ceil(25.5) - 1, lam[top])  # log P(K >= 26)
    expected = torch.as_tensor(logp.reshape(2, -1).sum(1))
    torch.testing.assert_close(noise.log_likelihood(y, Ax), expected, rtol=1e-9, atol=1e-9)


def test_poisson_log_likelihood_gradient_is_finite():
    noise = get_noise("poisson", rate=1.0)
    Ax = _Ax(batch=2).requires_grad_(True)
    y = noise(Ax, generator=torch.Generator().manual_seed(6))
    y[0, 0, 0, 0] = 1.0
    with torch.no_grad():
        Ax[1, 0, 0, 0] = -1.5  # zero intensity
    y[1, 0, 0, 0] = -1.0  # and a zero count there
    noise.log_likelihood(y, Ax).sum().backward()
    assert torch.isfinite(Ax.grad).all()


def test_clean_is_a_point_mass():
    noise = get_noise("clean")
    Ax = _Ax()
    y = noise(Ax, generator=torch.Generator())
    assert torch.equal(y, Ax)
    y2 = y.clone()
    y2[1, 0, 0, 0] += 1e-3
    ll = noise.log_likelihood(y2, Ax)
    assert ll[0] == 0 and ll[2] == 0 and ll[1] == float("-inf")

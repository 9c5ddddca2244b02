"""The latent refinement's two return rules: "last" (the reference code) and "best" (our fix)."""
import torch

from smc.optimise import latent_refinement


class LinearDecoder:
    """decode(z) = W z on flat latents [B, d] -> [B, m]."""

    def __init__(self, W):
        self.W = W

    def decode(self, z):
        return z @ self.W.T


def _adamw_steps(model, y0, z0, lr, steps):
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (y0 - model.decode(z)).pow(2).mean(1).sum().backward()
        opt.step()
    return z.detach()


def test_refine_last_is_the_value_after_the_last_step_and_best_never_worse():
    g = torch.Generator().manual_seed(0)
    model = LinearDecoder(torch.randn(6, 4, generator=g, dtype=torch.float64))
    z0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y0 = torch.randn(3, 6, generator=g, dtype=torch.float64)
    identity = lambda x: x  # noqa: E731
    last = latent_refinement(model, identity, y0, z0, lr=0.05, max_iters=7, patience=100, tol=0.0,
                             keep="last")
    assert torch.allclose(last, _adamw_steps(model, y0, z0, 0.05, 7), atol=1e-12)
    best = latent_refinement(model, identity, y0, z0, lr=0.05, max_iters=7, patience=100, tol=0.0,
                             keep="best")
    # "best" keeps the lowest evaluated iterate: here the loss falls monotonically, so it is
    # the value after 6 steps (the 7th step's result is never evaluated).
    assert torch.allclose(best, _adamw_steps(model, y0, z0, 0.05, 6), atol=1e-12)
    loss = lambda z: (y0 - model.decode(z)).pow(2).mean(1)  # noqa: E731
    assert (loss(best) <= loss(z0)).all()


def test_refine_best_is_never_worse_than_the_start_even_when_steps_overshoot():
    g = torch.Generator().manual_seed(1)
    model = LinearDecoder(torch.randn(5, 5, generator=g, dtype=torch.float64))
    y0 = torch.randn(2, 5, generator=g, dtype=torch.float64)
    z0 = torch.linalg.solve(model.W, y0.T).T + 1e-3  # start next to the optimum
    identity = lambda x: x  # noqa: E731
    loss = lambda z: (y0 - model.decode(z)).pow(2).mean(1)  # noqa: E731
    # a huge learning rate overshoots: the reference's last value is worse than z0
    last = latent_refinement(model, identity, y0, z0, lr=1.0, max_iters=3, patience=100, tol=0.0,
                             keep="last")
    best = latent_refinement(model, identity, y0, z0, lr=1.0, max_iters=3, patience=100, tol=0.0,
                             keep="best")
    assert (loss(last) > loss(z0)).all()
    assert torch.equal(best, z0)

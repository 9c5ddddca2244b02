"""A latent diffusion model whose posterior is known in closed form (spec section 5).

Latent prior p(z0) = sum_k pi_k N(m_k, c_k I) in dimension d (isotropic components),
decoder D(z) = W z (an "image" is a vector [m]), linear operator A [p, m], Gaussian
noise y0 = A W z0 + n, n ~ N(0, sigma_y^2 I). Then:
- p_t(z) = sum_k pi_k N(z; sqrt(abar_t) m_k, (abar_t c_k + 1 - abar_t) I), and
  eps(z, t) = -sqrt(1 - abar_t) grad log p_t(z) is exact;
- p(z0 | y0) = sum_k pi'_k N(mu_k, P_k) with H = A W,
  P_k = (I / c_k + H^T H / sigma_y^2)^-1, mu_k = P_k (m_k / c_k + H^T y0 / sigma_y^2),
  pi'_k proportional to pi_k N(y0; H m_k, c_k H H^T + sigma_y^2 I).
Everything runs in float64; latents are [B, d], images [B, m], measurements [B, p].
"""
from __future__ import annotations

import math

import torch
from torch import nn



def linear_alphas_cumprod(timesteps: int = 1000, start: float = 0.0015, end: float = 0.0195):
    """abar_t = prod_{s<=t} (1 - beta_s), betas = linspace(sqrt(start), sqrt(end), T)^2 (float64)."""
    betas = torch.linspace(math.sqrt(start), math.sqrt(end), timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class GaussianMixtureLDM(nn.Module):
    """The latent-diffusion interface (docs/design.md section 1) with an exact eps.

    means [K, d], variances [K] (component covariances c_k I), weights [K],
    W [m, d] (decoder, full column rank). latent_shape = (d,), image_shape = (m,).
    """

    def __init__(self, means, variances, weights, W, alphas_cumprod=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        K, d = means.shape
        variances = torch.as_tensor(variances, dtype=torch.float64).reshape(-1).expand(K).clone()
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        W = torch.as_tensor(W, dtype=torch.float64)
        if weights.numel() != K or (weights < 0).any():
            raise ValueError(f"weights must be {K} non-negative numbers")
        if W.dim() != 2 or W.shape[1] != d:
            raise ValueError(f"W must be [m, {d}], got shape {tuple(W.shape)}")
        if alphas_cumprod is None:
            alphas_cumprod = linear_alphas_cumprod()
        self.register_buffer("means", means)
        self.register_buffer("variances", variances)
        self.register_buffer("log_pi", torch.log(weights / weights.sum()))
        self.register_buffer("W", W)
        self.register_buffer("W_pinv", torch.linalg.pinv(W))
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))
        self.latent_shape = (d,)
        self.image_shape = (W.shape[0],)

    @property
    def device(self) -> torch.device:
        return self.means.device

    def log_prob_t(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(z) per row: z [M, d], t [M] long -> [M]."""
        a = self.alphas_cumprod[t][:, None]                           # [M, 1]
        var = a * self.variances[None] + (1 - a)                      # [M, K]
        diff = z[:, None, :] - a.sqrt()[:, :, None] * self.means[None]  # [M, K, d]
        d = z.shape[1]
        comp = -0.5 * diff.pow(2).sum(-1) / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.logsumexp(self.log_pi[None] + comp, dim=1)

    def eps(self, z: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """eps(z, t) = -sqrt(1 - abar_t) grad_z log p_t(z); differentiable in z. [M, d] -> [M, d].

        t = T (one past the schedule, the release's first call: `start_at_T`) uses abar_{T-1},
        the abar the sampler pairs it with.
        """
        a = self.alphas_cumprod[t.clamp_max(self.alphas_cumprod.numel() - 1)][:, None]
        var = a * self.variances[None] + (1 - a)                      # [M, K]
        diff = z[:, None, :] - a.sqrt()[:, :, None] * self.means[None]
        logits = self.log_pi[None] - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * z.shape[1] * torch.log(var)
        r = torch.softmax(logits, dim=1)                              # responsibilities [M, K]
        score = -(r[:, :, None] * diff / var[:, :, None]).sum(1)
        return -(1 - a).sqrt() * score

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """D(z) = W z: [M, d] -> [M, m]."""
        return z @ self.W.T

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) = W^+ x: [M, m] -> [M, d]."""
        return x @ self.W_pinv.T

    def sample_prior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n exact draws of z0 ~ p(z0): [n, d]."""
        k = torch.multinomial(self.log_pi.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt()[:, None] * noise

    def posterior(self, A: torch.Tensor, y0: torch.Tensor, sigma_y: float):
        """Exact p(z0 | y0) for y0 = A W z0 + N(0, sigma_y^2 I): (log weights [K], means [K, d], covs [K, d, d])."""
        H = A.to(torch.float64) @ self.W
        y0 = y0.to(torch.float64).reshape(-1)
        d, p = H.shape[1], H.shape[0]
        eye_d, eye_p = torch.eye(d, dtype=torch.float64), torch.eye(p, dtype=torch.float64)
        HtH, Hty = H.T @ H / sigma_y ** 2, H.T @ y0 / sigma_y ** 2
        log_w, mus, covs = [], [], []
        for k in range(self.means.shape[0]):
            c = self.variances[k]
            P = torch.linalg.inv(eye_d / c + HtH)
            mus.append(P @ (self.means[k] / c + Hty))
            covs.append(0.5 * (P + P.T))
            S = c * H @ H.T + sigma_y ** 2 * eye_p
            ev = torch.distributions.MultivariateNormal(H @ self.means[k], S).log_prob(y0)
            log_w.append(self.log_pi[k] + ev)
        log_w = torch.stack(log_w)
        return log_w - torch.logsumexp(log_w, 0), torch.stack(mus), torch.stack(covs)

    def sample_posterior(self, A, y0, sigma_y: float, n: int, generator: torch.Generator):
        """n exact draws from p(z0 | y0): [n, d]."""
        log_w, mus, covs = self.posterior(A, y0, sigma_y)
        k = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(covs)
        noise = torch.randn(n, mus.shape[1], generator=generator, dtype=torch.float64)
        return mus[k] + (L[k] @ noise[:, :, None])[:, :, 0]


class LinearOperator(nn.Module):
    """A(x) = A x for vector "images": x [M, m] -> [M, p]; transpose y [M, p] -> [M, m]."""

    is_linear = True

    def __init__(self, A):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.T

    def transpose(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A


def svd_operator(p: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """Random A [p, m] = U diag(s) V^T with sorted uniform singular values (MCGdiff-style)."""
    U, _ = torch.linalg.qr(torch.randn(p, p, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    s = torch.sort(torch.rand(min(p, m), generator=generator, dtype=torch.float64), descending=True).values
    S = torch.zeros(p, m, dtype=torch.float64)
    S[range(len(s)), range(len(s))] = s
    return U @ S @ V.T


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int,
                       generator: torch.Generator) -> float:
    """Sliced 2-Wasserstein distance between two equal-size samples a, b [n, d].

    SW_2^2 = E_theta W_2^2(theta^T a, theta^T b), theta uniform on the sphere; each 1-D
    W_2 between empirical measures is the mean squared gap of the sorted projections.
    """
    if a.shape != b.shape:
        raise ValueError(f"samples must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double() @ theta, dim=0).values
    pb = torch.sort(b.double() @ theta, dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


def make_toy_problem(d: int = 4, m: int = 4, p: int = 2, num_components: int = 6,
                     spread: float = 1.5, component_var: float = 1.0, sigma_y: float = 0.3,
                     seed: int = 0):
    """A small overlapping-mixture problem (spec section 5, practical notes).

    Means ~ N(0, spread^2 I) (spread comparable to the component width), W [m, d] with
    orthonormal columns, A [p, m] from `svd_operator`, y0 = A W z0 + N(0, sigma_y^2)
    for one prior draw z0. Returns (model, operator, y0 [1, p], z0 [1, d]).
    """
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(num_components, d, generator=g, dtype=torch.float64)
    W = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))[0]
    model = GaussianMixtureLDM(means, component_var, torch.ones(num_components), W)
    op = LinearOperator(svd_operator(p, m, g))
    z0 = model.sample_prior(1, g)
    y0 = op(model.decode(z0)) + sigma_y * torch.randn(1, p, generator=g, dtype=torch.float64)
    return model, op, y0, z0

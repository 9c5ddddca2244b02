"""Vector quantiser of the VQ autoencoder (CompVis ``VectorQuantizer2`` semantics)."""
import torch
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient.

    For each position, with z [B, e_dim, H, W] and codebook e_k (k < n_e):
        k* = argmin_k ||z - e_k||^2 = argmin_k (||z||^2 + ||e_k||^2 - 2 z.e_k),
        z_q = z + (e_{k*} - z).detach()   (forward value e_{k*}, gradient identity),
        loss = mean((e_{k*}.detach() - z)^2) + beta * mean((e_{k*} - z.detach())^2)  (legacy=True;
        legacy=False swaps where beta goes).
    forward(z) -> (z_q [B, e_dim, H, W], loss [], (perplexity [], None, indices [B, H, W] long)).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, legacy: bool = True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        # The codebook's init is taming's uniform one; passing the storage skips nn.Embedding's own
        # N(0, 1) init, which the uniform one overwrote anyway (and whose first call on the meta
        # device, where load_model builds, costs about a second).
        self.embedding = nn.Embedding(n_e, e_dim, _weight=torch.empty(n_e, e_dim))
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor):
        if z.ndim != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer expects z [B, {self.e_dim}, H, W], got {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, H, W, e_dim]
        z_flat = z.view(-1, self.e_dim)
        codebook = self.embedding.weight
        d = (z_flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
             - 2 * torch.einsum("bd,dn->bn", z_flat, codebook.t()))
        indices = torch.argmin(d, dim=1)
        z_q = self.embedding(indices).view(z.shape)
        if self.legacy:
            loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        counts = torch.bincount(indices, minlength=self.n_e).to(z.dtype) / indices.numel()
        perplexity = torch.exp(-torch.sum(counts * torch.log(counts + 1e-10)))
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q, loss, (perplexity, None, indices.view(z.shape[0], z.shape[1], z.shape[2]))

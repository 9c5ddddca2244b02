"""Attention kernels and the spatial transformer (cross-attention) of the CompVis UNet.

Every attention in the stack goes through :func:`dot_product_attention`, which has two
interchangeable backends giving the same numbers within float tolerance:

- ``"legacy"``: the explicit ``softmax(q k^T / sqrt(d)) v`` with einsum, as the original
  code computes it (softmax in float32);
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where
  the platform has them).

Modules that attend carry an ``attention_backend`` attribute; ``LatentDiffusion.set_attention``
sets it on every such module.
"""
import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "legacy")


def check_attention_backend(name: str) -> str:
    """Return ``name`` if it is a known attention backend, else raise a clear ValueError."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {ATTENTION_BACKENDS}")
    return name


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(d)) v``.

    Shapes: q [N, Tq, d], k [N, Tk, d], v [N, Tk, dv] -> [N, Tq, dv]
    (N folds batch and heads).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "legacy":
        scale = q.shape[-1] ** -0.5
        weight = torch.einsum("nid,njd->nij", q, k) * scale
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("nij,njd->nid", weight, v)
    raise ValueError(f"unknown attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (output layers start at zero, as in CompVis)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GEGLU(nn.Module):
    """Gated GELU: ``a * gelu(g)`` with ``[a, g] = W x + b`` split in two along the last dim."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: (GEGLU or Linear+GELU) to ``mult * dim``, dropout, Linear back."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, T, query_dim] on a context [B, S, context_dim].

    With ``context=None`` it is self-attention. heads * dim_head is the inner width;
    keys/queries/values have no bias, the output projection has one.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.attention_backend = "sdpa"
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = x.shape[0], self.heads

        def split_heads(t):  # [B, T, h*d] -> [B*h, T, d]
            return t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(b * h, t.shape[1], -1)

        out = dot_product_attention(split_heads(q), split_heads(k), split_heads(v), self.attention_backend)
        out = out.reshape(b, h, out.shape[1], -1).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on the context, GEGLU MLP."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: int | None = None, gated_ff: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, cross-attending to a context.

    x [B, C, H, W] -> GroupNorm(32, eps 1e-6) -> 1x1 conv to n_heads*d_head -> tokens
    [B, H*W, n_heads*d_head] -> ``depth`` transformer blocks -> 1x1 conv back -> + x.
    context: [B, S, context_dim] or None (then cross-attention is self-attention).
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        inner = n_heads * d_head
        self.in_channels = in_channels
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, dropout=dropout, context_dim=context_dim)
             for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C']
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(x) + x_in

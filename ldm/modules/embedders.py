"""Conditioning encoders (CompVis ``ldm/modules/encoders/modules.py``)."""
import torch
from torch import nn


class ClassEmbedder(nn.Module):
    """Class label -> one context token: labels [B] long -> embedding [B, 1, embed_dim]."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class_label"):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"class labels must be an integer tensor [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(f"class labels must lie in [0, {self.n_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return self.embedding(labels.long()[:, None])

"""Image data: a folder dataset returning (index, image in [-1, 1], filename)."""
from .dataset import ImageFolderDataset, get_dataloader, get_dataset

__all__ = ["ImageFolderDataset", "get_dataset", "get_dataloader"]

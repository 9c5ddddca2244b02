"""A folder of images as a dataset of ``(index, image [3, S, S] in [-1, 1], filename)``."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from util.images import list_images, load_image


class ImageFolderDataset(Dataset):
    """Images (png/jpg/jpeg) directly in ``root``, in sorted filename order.

    Each is read as RGB, its shorter side scaled to ``image_size`` (bicubic) and the central
    square cropped, then mapped to [-1, 1] (x / 127.5 - 1). Item i is
    ``(i, x [3, image_size, image_size] float32, filename)``. A missing or empty folder
    raises at construction, naming the folder; an unreadable file raises when read,
    naming the file.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256):
        self.root = Path(root)
        self.image_size = int(image_size)
        self.files = list_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        return index, load_image(path, self.image_size)[0], path.name


def get_dataset(name: str, root: str | os.PathLike, image_size: int = 256, **kwargs) -> ImageFolderDataset:
    """DPS-style ``get_dataset(name, root)``: every task's data (``ffhq``, ``imagenet``,
    ``mnist-demo``, ...) is a folder of images here, so ``name`` only labels it."""
    if kwargs:
        raise TypeError(f"get_dataset got unknown argument(s) {sorted(kwargs)}; valid: name, root, image_size")
    ds = ImageFolderDataset(root, image_size)
    ds.name = name
    return ds


def get_dataloader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0, train: bool = False):
    """A ``DataLoader`` in file order (no shuffling unless ``train``), as DPS builds it."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train,
                                       num_workers=num_workers, drop_last=train)

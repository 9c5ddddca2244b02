"""A folder of images as a dataset of ``(index, image [3, S, S] in [-1, 1], filename)``."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from util.images import list_images, load_image, load_pil


class ImageFolderDataset(Dataset):
    """Images (png/jpg/jpeg) directly in ``root``, in sorted filename order (hidden files skipped).

    Each is read as 8-bit RGB, its shorter side scaled to ``image_size`` and the central
    square cropped (``resize``: "bicubic", PIL bicubic, ours; or "release", the LD-SMC
    release's torchvision Resize + CenterCrop), then mapped to [-1, 1] (x / 127.5 - 1).
    Item i is ``(i, x [3, image_size, image_size] float32, filename)``. A missing or empty
    folder raises at construction, naming the folder; an unreadable file raises when read
    (or by ``unreadable``), naming the file.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256, resize: str = "bicubic"):
        self.root = Path(root)
        self.image_size = int(image_size)
        self.resize = resize
        self.files = list_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        return index, load_image(path, self.image_size, self.resize)[0], path.name

    def unreadable(self, indices) -> list[str]:
        """The reasons items `indices` cannot be read (each decoded once), e.g. to report them all at once."""
        bad = []
        for i in indices:
            try:
                load_pil(self.files[i])
            except (ValueError, OSError) as e:
                bad.append(str(e))
        return bad


def get_dataset(name: str, root: str | os.PathLike, image_size: int = 256, resize: str = "bicubic",
                **kwargs) -> ImageFolderDataset:
    """DPS-style ``get_dataset(name, root)``: every task's data (``ffhq``, ``imagenet``,
    ``mnist-demo``, ...) is a folder of images here, so ``name`` only labels it."""
    if kwargs:
        raise TypeError(f"get_dataset got unknown argument(s) {sorted(kwargs)}; valid: name, root, image_size, "
                        f"resize")
    ds = ImageFolderDataset(root, image_size, resize)
    ds.name = name
    return ds


def get_dataloader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0, train: bool = False):
    """A ``DataLoader`` in file order (no shuffling unless ``train``), as DPS builds it."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train,
                                       num_workers=num_workers, drop_last=train)


def read_labels(path: str | os.PathLike, files) -> list[int]:
    """Class labels of `files` (in order) from a text file of `filename label` (or `filename,label`) lines.

    Blank lines and lines starting with '#' are skipped. Raises ValueError naming the file
    and line of a malformed entry, or the files without a label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.labels_file {path} does not exist (a text file of 'filename label' lines)")
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}, line {n}: expected 'filename label', got {line!r}")
        table[parts[0]] = int(parts[1])
    missing = [Path(f).name for f in files if Path(f).name not in table]
    if missing:
        raise ValueError(f"{path} has no label for {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    return [table[Path(f).name] for f in files]

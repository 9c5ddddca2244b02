"""Image file <-> tensor helpers: load to [-1, 1], save PNGs atomically, convert to uint8.

Tensors are ``[B, 3, H, W]`` or ``[3, H, W]`` with values in ``value_range``: (-1, 1)
for model space (the default) or (0, 1) for display / metrics.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from util.files import atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped: (x + 1) / 2."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: 2 x - 1."""
    return 2.0 * x - 1.0


def to_uint8(x: torch.Tensor, value_range=(-1.0, 1.0)) -> np.ndarray:
    """``[3, H, W]`` -> ``[H, W, 3]`` (or ``[B, 3, H, W]`` -> ``[B, H, W, 3]``) uint8, rounded."""
    if x.dim() not in (3, 4) or x.shape[-3] not in (1, 3):
        raise ValueError(f"to_uint8 expects [C, H, W] or [B, C, H, W] with C = 1 or 3, got {tuple(x.shape)}")
    lo, hi = value_range
    unit = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (unit * 255.0).round().to(torch.uint8).movedim(-3, -1).numpy()


RESIZE_METHODS = ("bicubic", "release")


def _to_8bit(im: Image.Image, path: Path) -> Image.Image:
    """16-bit greyscale (mode I;16*, or I from a PNG) scaled to 8 bits as v / 257 (65535 -> 255).

    PIL's convert("RGB") would clip every value above 255 to white instead. Other modes
    PIL already reads as 8 bits (16-bit RGB PNGs keep their high byte); anything else with
    more than 8 bits (32-bit integer or float images) is refused, naming the file.
    """
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        arr = np.asarray(im).astype(np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"cannot read {path}: 16-bit image with values outside 0..65535")
        return Image.fromarray(np.round(arr / 257.0).astype(np.uint8), mode="L")
    if im.mode in ("I", "F"):
        raise ValueError(f"cannot read {path}: {'32-bit integer' if im.mode == 'I' else 'floating-point'} "
                         f"images are not supported; save it as an 8- or 16-bit PNG or a JPEG")
    return im


def load_pil(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB; a clear error names a missing or unreadable file.

    16-bit greyscale is scaled to 8 bits (not clipped); an image larger than Pillow's
    decompression-bomb limit is refused with the limit and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return _to_8bit(im, path).convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"cannot read {path}: {e.args[0] if e.args else e} Downscale the image (the sampler "
                         f"resizes it to the model's size anyway)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image ({e}); use a PNG or JPEG file") from None


def resize_center_crop(im: Image.Image, size: int, method: str = "bicubic") -> Image.Image:
    """Scale the shorter side to ``size``, then crop the central size x size square.

    method "bicubic" (ours): PIL bicubic, crop offset floor((n - size) / 2).
    method "release": the LD-SMC release's torchvision ``Resize(size)`` (bilinear, which on
    a PIL image is PIL's antialiased bilinear) + ``CenterCrop(size)``, called as they are, so
    the pixels are exactly theirs.
    """
    if method == "release":
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        im = TF.resize(im, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(im, size)
    if method != "bicubic":
        raise ValueError(f"unknown resize method {method!r}: choose one of {RESIZE_METHODS}")
    w, h = im.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` float32 in [-1, 1] (x / 127.5 - 1)."""
    arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def load_image(path: str | os.PathLike, size: int | None = None, resize: str = "bicubic") -> torch.Tensor:
    """Load ``path`` to a ``[1, 3, H, W]`` tensor in [-1, 1]; resize + centre-crop to ``size`` if given
    (``resize``: "bicubic" or "release", see ``resize_center_crop``)."""
    im = load_pil(path)
    if size is not None:
        im = resize_center_crop(im, int(size), resize)
    return pil_to_tensor(im)[None]


def png_bytes(image: np.ndarray) -> bytes:
    """[H, W] or [H, W, 3] uint8 -> PNG file contents."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_image(x: torch.Tensor, path: str | os.PathLike, value_range=(-1.0, 1.0)) -> Path:
    """Write ``x`` ([3, H, W], [1, 3, H, W] or [1 or 3 channels]) to a PNG, atomically.

    The PNG goes to a temporary file in the target folder, then ``os.replace`` moves it
    over ``path``, so a reader never sees a half-written file.
    """
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"save_image writes one image; got a batch of {x.shape[0]} (save them one by one)")
        x = x[0]
    arr = to_uint8(x, value_range)
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    return atomic_write_bytes(path, png_bytes(arr))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Sorted image files (png/jpg/jpeg, any case) directly in ``folder``; clear errors if none.

    Hidden files (names starting with '.', e.g. macOS's ``._x.png`` resource forks) are skipped.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} is a file, not a folder of images")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"image folder {folder} has no .png/.jpg/.jpeg images")
    return files

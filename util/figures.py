"""Per-image figure of a restoration: measurement, reconstructions, ground truth, and the ESS over time."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch


def restoration_figure(panels: Sequence[tuple[str, np.ndarray | None]], ess: np.ndarray | None,
                       num_particles: int, title: str = "") -> bytes:
    """Render one PNG: image panels in a row, then the ESS per transition.

    panels: (title, [H, W, 3] uint8 image or None for "not image-shaped"), e.g.
        measurement, recon, recon_opt, ground truth.
    ess: [transitions] effective sample size after each weight update (None: no plot).
    Returns the PNG file contents (the caller writes them atomically).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(panels) + (ess is not None)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.7), dpi=100)
    axes = np.atleast_1d(axes)
    for ax, (name, img) in zip(axes, panels):
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if img is None:
            ax.text(0.5, 0.5, "not an image", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        else:
            ax.imshow(img, interpolation="nearest")
    if ess is not None:
        ax = axes[-1]
        ess = np.asarray(ess, dtype=float).reshape(-1)
        ax.plot(np.arange(1, len(ess) + 1), ess, lw=1.2)
        ax.set_ylim(0, num_particles * 1.05)
        ax.set_xlabel("transition (T -> 0)", fontsize=8)
        ax.set_title(f"ESS (N = {num_particles})", fontsize=9)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def measurement_images(y: torch.Tensor, operator_name: str) -> np.ndarray | None:
    """The measurement y [B, C, h, w] as uint8 images [B, h, w, 3] where it is image-shaped, else None.

    Images in [-1, 1] (masked, blurred, downsampled) are shown as they are; a Fourier
    magnitude (phase retrieval) as log(1 + |y|), scaled per image to [0, 1].
    """
    from util.images import to_uint8

    if y.dim() != 4 or y.shape[1] not in (1, 3):
        return None
    if operator_name == "phase_retrieval":
        mag = torch.log1p(y.abs())
        lo = mag.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = mag.flatten(1).max(1).values.view(-1, 1, 1, 1)
        return to_uint8((mag - lo) / (hi - lo).clamp(min=1e-12), value_range=(0.0, 1.0))
    return to_uint8(y)



def baseline(x: torch.Tensor, y: torch.Tensor, operator_name: str):
    """The simple reference a reconstruction is compared with: (name, image [B, C, H, W] in [-1, 1]) or (None, None).

    Where y is an image of x's shape (inpainting: the masked input; deblurring: the blurred
    input): y itself, "measurement". Super-resolution: bicubic upsampling of y to x's size
    (the usual baseline of SR papers), "bicubic". Phase retrieval: none (see `baseline_note`).
    """
    import torch.nn.functional as F

    if operator_name == "super_resolution" and y.dim() == 4 and y.shape[:2] == x.shape[:2]:
        return "bicubic", F.interpolate(y, size=tuple(x.shape[-2:]), mode="bicubic", align_corners=False).clamp(-1, 1)
    if operator_name != "phase_retrieval" and y.shape == x.shape:
        return "measurement", y.clamp(-1, 1)
    return None, None


def baseline_note(name: str | None, operator_name: str) -> str:
    """What the baseline `name` of `baseline` is, or why a task has none."""
    if name == "measurement":
        return "baseline: the measurement y (the masked or blurred input)"
    if name == "bicubic":
        return "baseline: bicubic upsampling of y to the image size"
    if operator_name == "phase_retrieval":
        # A zero-phase (or any other) image made from |F x| alone measures an arbitrary choice:
        # every shift or flip of x, and many other images, have the same Fourier magnitude.
        return ("no baseline for phase retrieval: y is a Fourier magnitude, which every shift or flip of x "
                "also fits, so no image made from y alone is a meaningful reference")
    return f"no baseline: the measurement of {operator_name} is not an image of the ground truth's size"

"""The demo figure: rows of measurement, reconstruction, refined reconstruction and ground truth.

    python scripts/demo_figure.py results/ld_smc/inpainting_box docs/assets/demo_inpainting.png

Reads the PNGs a `sample_condition.py` run wrote (`label/`, `recon/`, `recon_opt/`, `input/`)
for its first `--count` images and writes one grid image, 4x upscaled (nearest neighbour).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROWS = ("label", "recon", "recon_opt", "input")


def grid(run: Path, count: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """[rows * (h + pad), count * (w + pad), 3] uint8: one row per output kind, one column per image."""
    names = sorted(p.name for p in (run / "input").glob("*.png"))[:count]
    if not names:
        raise SystemExit(f"error: {run / 'input'} has no images: pass a task folder of a finished run")
    tiles = [[np.asarray(Image.open(run / kind / n).convert("RGB")) for n in names]
             for kind in ROWS if (run / kind).is_dir()]
    h, w = tiles[0][0].shape[:2]
    out = np.full((len(tiles) * (h + pad), len(names) * (w + pad), 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, img in enumerate(row):
            out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return np.kron(out, np.ones((scale, scale, 1), np.uint8))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a task folder: SAVE_DIR/<method>/<task>")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--count", type=int, default=10, help="images (columns), default 10")
    args = p.parse_args(argv)
    Image.fromarray(grid(args.run, args.count)).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FID of a finished `sample_condition.py` run: reconstructions against the ground truth.

    python scripts/evaluate.py results/ld_smc/inpainting_box                 # FID(input, recon), FID(input, recon_opt)
    python scripts/evaluate.py results/ld_smc/inpainting_box --device cuda --dims 2048

Reads `<task dir>/input/` and the reconstruction folders the run wrote, computes the
Frechet Inception distance as pytorch-fid does, prints it and writes `<task dir>/fid.json`.
Per-image PSNR / SSIM / LPIPS are already in the run's `metrics.csv`. The Inception
weights (`pt_inception-2015-12-05-6726825d.pth`) must be in torch's hub checkpoints
folder or given with `--weights`; when they are missing the script says which file to
download and where to put it, and computes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.files import atomic_write_text  # noqa: E402
from util.metrics import FID_INCEPTION_URL, MissingWeightsError, fid_from_folders, hub_checkpoint  # noqa: E402

FOLDERS = ("recon", "recon_opt")


def check_weights(weights):
    """The Inception weights file to use (None: the hub checkpoints folder), loaded once to check it.

    A truncated or corrupted file is an error naming it and where to download it again.
    """
    import pickle
    import zipfile

    import torch

    if weights == "random":
        return weights
    path = Path(weights) if weights is not None else Path(hub_checkpoint(FID_INCEPTION_URL, "FID"))
    if not path.is_file():
        raise MissingWeightsError(f"FID Inception weights file {path} does not exist (download from "
                                  f"{FID_INCEPTION_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else "the file ends too early"
        raise ValueError(f"FID Inception weights file {path} cannot be read ({reason}): it is truncated or not "
                         f"a PyTorch weights file; download it again from {FID_INCEPTION_URL}") from None
    if not isinstance(state, dict):
        raise ValueError(f"FID Inception weights file {path} holds no state dict; download it again from "
                         f"{FID_INCEPTION_URL}")
    return str(path)


def evaluate_fid(task_dir, which=FOLDERS, weights=None, dims: int = 2048, device="cpu",
                 batch_size: int = 50) -> dict:
    """{"fid_<folder>": FID(input, folder)} for each reconstruction folder present, written to fid.json.

    `weights` as in `util.metrics.fid_inception` (None: the hub checkpoints folder).
    """
    task_dir = Path(task_dir)
    truth = task_dir / "input"
    if not truth.is_dir():
        raise FileNotFoundError(f"{task_dir} has no input/ folder: give the task folder that "
                                f"sample_condition.py wrote (e.g. results/ld_smc/inpainting_box)")
    weights = check_weights(weights)
    out = {"task_dir": str(task_dir), "dims": dims, "reportable": weights != "random"}
    for name in which:
        folder = task_dir / name
        if folder.is_dir():
            out[f"fid_{name}"] = fid_from_folders(truth, folder, dims=dims, batch_size=batch_size,
                                                  device=device, weights=weights)
            out[f"n_{name}"] = sum(1 for _ in folder.glob("*.png"))
    if len(out) == 3:
        raise FileNotFoundError(f"{task_dir} has none of the folders {list(which)}")
    atomic_write_text(task_dir / "fid.json", json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task_dir", help="a task folder written by sample_condition.py")
    p.add_argument("--which", nargs="+", default=list(FOLDERS), help="reconstruction folders to score")
    p.add_argument("--weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--dims", type=int, default=2048, help="Inception feature dimension (64, 192, 768, 2048)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=50)
    args = p.parse_args(argv)
    if args.weights == "random":
        p.error("--weights random is for tests only and gives no FID number")
    try:
        out = evaluate_fid(args.task_dir, args.which, args.weights, args.dims, args.device, args.batch_size)
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, value in out.items():
        if key.startswith("fid_"):
            print(f"{key[4:]}: FID {value:.3f} over {out['n_' + key[4:]]} images")
    print(f"wrote {Path(args.task_dir) / 'fid.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

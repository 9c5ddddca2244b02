"""FID and LPIPS of a finished `sample_condition.py` run: reconstructions against the ground truth.

    python scripts/evaluate.py results/ld_smc/inpainting_box                 # FID(input, recon), FID(input, recon_opt)
    python scripts/evaluate.py results/ld_smc/inpainting_box --device cuda --dims 2048
    python scripts/evaluate.py results/ld_smc/inpainting_box --metrics lpips  # per-image LPIPS from the saved PNGs

Reads `<task dir>/input/` and the reconstruction folders the run wrote. FID: the Frechet
Inception distance as pytorch-fid computes it, printed and written to `<task dir>/fid.json`.
LPIPS(alex) per image, for a run that had no LPIPS weights while it sampled (a run that had
them already holds LPIPS in `metrics.csv`, computed before the 8-bit rounding of the PNGs):
printed as mean +- std and written per image to `<task dir>/lpips.json`, which
`scripts/reproduce.py --aggregate_only` reads. The weights (Inception:
`pt_inception-2015-12-05-6726825d.pth`; LPIPS: torchvision's `alexnet-owt-7be5be79.pth`) must
be in torch's hub checkpoints folder or given with `--weights` / `--lpips_weights`; when one is
missing the script says which file to download and where to put it, and computes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.files import atomic_write_text  # noqa: E402
from util.metrics import (FID_INCEPTION_URL, MissingWeightsError, fid_from_folders, hub_checkpoint,  # noqa: E402
                          read_weights)

METRICS = ("fid", "lpips")

FOLDERS = ("recon", "recon_opt")


def check_weights(weights):
    """The Inception weights file to use (None: the hub checkpoints folder), loaded once to check it.

    A truncated or corrupted file is an error naming it and where to download it again.
    """
    if weights == "random":
        return weights
    path = Path(weights) if weights is not None else Path(hub_checkpoint(FID_INCEPTION_URL, "FID"))
    if not path.is_file():
        raise MissingWeightsError(f"FID Inception weights file {path} does not exist (download from "
                                  f"{FID_INCEPTION_URL})")
    read_weights(path, "FID Inception", FID_INCEPTION_URL)
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


def evaluate_lpips(task_dir, which=FOLDERS, weights=None, device="cpu", batch_size: int = 50) -> dict:
    """Per-image LPIPS(alex) of each reconstruction folder present against input/, written to lpips.json:
    {"lpips_<folder>": {png name: value}, "n_<folder>": count, ...}.

    Pairs images by file name (`00000.png` in both folders); a reconstruction without its
    ground truth is an error naming it. `weights` as `util.metrics.LPIPS`'s backbone_weights
    (None: the hub checkpoints folder; "random": tests only, then "reportable" is False).
    """
    import torch

    from util.images import load_image, list_images
    from util.metrics import LPIPS

    task_dir = Path(task_dir)
    truth = task_dir / "input"
    if not truth.is_dir():
        raise FileNotFoundError(f"{task_dir} has no input/ folder: give the task folder that "
                                f"sample_condition.py wrote (e.g. results/ld_smc/inpainting_box)")
    folders = [task_dir / name for name in which if (task_dir / name).is_dir()]
    if not folders:
        raise FileNotFoundError(f"{task_dir} has none of the folders {list(which)}")
    metric = LPIPS("alex", backbone_weights=weights, device=device)
    out = {"task_dir": str(task_dir), "net": "alex", "reportable": metric.reportable,
           "source": "the saved 8-bit PNGs"}
    for folder in folders:
        files = list_images(folder)
        missing = [f.name for f in files if not (truth / f.name).is_file()]
        if missing:
            raise FileNotFoundError(f"{truth} lacks the ground truth of {folder.name}/{missing[0]} "
                                    f"({len(missing)} file(s) in all)")
        values = {}
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            x = torch.cat([load_image(f) for f in chunk]).to(device)
            gt = torch.cat([load_image(truth / f.name) for f in chunk]).to(device)
            with torch.no_grad():
                values.update(zip((f.name for f in chunk), metric(x, gt).tolist()))
        out[f"lpips_{folder.name}"] = values
        out[f"n_{folder.name}"] = len(values)
    atomic_write_text(task_dir / "lpips.json", json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task_dir", help="a task folder written by sample_condition.py")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=["fid"], help="what to compute (default: fid)")
    p.add_argument("--which", nargs="+", default=list(FOLDERS), help="reconstruction folders to score")
    p.add_argument("--weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--lpips_weights", default=None, help="path of alexnet-owt-7be5be79.pth (LPIPS's backbone)")
    p.add_argument("--dims", type=int, default=2048, help="Inception feature dimension (64, 192, 768, 2048)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=50)
    args = p.parse_args(argv)
    if "random" in (args.weights, args.lpips_weights):
        p.error("random weights are for tests only and give no reportable number")
    try:
        if "lpips" in args.metrics:
            lp = evaluate_lpips(args.task_dir, args.which, args.lpips_weights, args.device, args.batch_size)
        if "fid" in args.metrics:
            out = evaluate_fid(args.task_dir, args.which, args.weights, args.dims, args.device, args.batch_size)
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "lpips" in args.metrics:
        import numpy as np
        for key, values in lp.items():
            if key.startswith("lpips_"):
                v = np.array(list(values.values()))
                print(f"{key[6:]}: LPIPS {v.mean():.4f} +- {v.std():.4f} over {len(v)} images")
        print(f"wrote {Path(args.task_dir) / 'lpips.json'}")
    if "fid" in args.metrics:
        for key, value in out.items():
            if key.startswith("fid_"):
                print(f"{key[4:]}: FID {value:.3f} over {out['n_' + key[4:]]} images")
        print(f"wrote {Path(args.task_dir) / 'fid.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

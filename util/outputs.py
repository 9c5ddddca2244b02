"""The output tree of a sampling run: atomic writes, resume, metrics.csv and summary.json.

Layout under `<save_dir>/<method>/<task>/` (one rule: different methods never share a task folder)::

    input/NNNNN.png      ground truth
    label/NNNNN.png      the measurement, where it is image-shaped
    recon/NNNNN.png      the method's reconstruction x0
    recon_opt/NNNNN.png  refined reconstruction D(z_opt), for methods that refine
    mask/NNNNN.png       inpainting mask (white = observed)
    figures/NNNNN.png    measurement | reconstructions | ground truth | ESS over time (SMC methods)
    records/NNNNN.json   per-image metrics; written last, so it marks the image as done
    run.json             the settings the outputs were made with (checked on resume)
    metrics.csv          one row per finished image (rebuilt from records/)
    summary.json         means, std, the resolved config, version, git commit, device

Every file is written to a temporary name in its folder and renamed into place, so an
interrupted run leaves no half-written file and loses at most the images in progress.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from util.config import ConfigError
from util.files import atomic_write_bytes, atomic_write_text
from util.images import png_bytes

IMAGE_KINDS = ("input", "label", "recon", "recon_opt", "mask", "figures")
METRIC_COLUMNS = ("index", "file", "class_label",
                  "psnr_recon", "ssim_recon", "lpips_recon",
                  "psnr_recon_opt", "ssim_recon_opt", "lpips_recon_opt",
                  "psnr_measurement", "ssim_measurement", "lpips_measurement",
                  "seconds")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    if isinstance(x, Path):
        return str(x)
    return x


class OutputTree:
    """Paths, resume state and tables of one run's outputs (`<save_dir>/<method>/<task>/`)."""

    def __init__(self, save_dir: str | Path, method: str, task: str):
        self.root = Path(save_dir) / method / task

    def path(self, kind: str, index: int) -> Path:
        """Where image `index` of kind `kind` (one of IMAGE_KINDS) goes."""
        if kind not in IMAGE_KINDS:
            raise ValueError(f"unknown output kind {kind!r}: one of {IMAGE_KINDS}")
        return self.root / kind / f"{index:05d}.png"

    def record_path(self, index: int) -> Path:
        return self.root / "records" / f"{index:05d}.json"

    def prepare(self, settings: Mapping, overwrite: bool, only: Iterable[int] | None = None) -> None:
        """Create the tree; with `overwrite` clear earlier outputs, else check they came from the same settings.

        `settings` is whatever determines the results (task, sampler, seed, model); a
        resumed run with different settings would mix two experiments, so it is refused.
        `only`: the images this process owns (one shard of several sharing the folder);
        `overwrite` then clears just those, leaving the other shards' files alone.
        """
        run_file = self.root / "run.json"
        if overwrite:
            self.clear(only)
        elif run_file.exists():
            try:
                before = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError):
                raise ConfigError(f"{run_file} is unreadable: pass --overwrite to start this task afresh") from None
            now = _jsonable(settings)
            diffs = _diff(before, now)
            if diffs:
                shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
                raise ConfigError(f"the outputs in {self.root} were made with other settings ({shown}); pass "
                                  f"--overwrite to redo them, or choose another --save_dir")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, settings)

    def clear(self, only: Iterable[int] | None = None) -> None:
        """Remove this tree's own outputs (only the files and folders it writes), or those of images `only`."""
        if only is not None:
            for i in only:
                self.record_path(i).unlink(missing_ok=True)  # first: the image no longer counts as done
                for kind in IMAGE_KINDS:
                    self.path(kind, i).unlink(missing_ok=True)
            return
        for kind in (*IMAGE_KINDS, "records"):
            shutil.rmtree(self.root / kind, ignore_errors=True)
        for name in ("run.json", "metrics.csv", "summary.json"):
            (self.root / name).unlink(missing_ok=True)

    def is_done(self, index: int) -> bool:
        """True when image `index` finished (its record, written last, exists)."""
        return self.record_path(index).exists()

    def save_png(self, kind: str, index: int, image: np.ndarray) -> None:
        atomic_write_bytes(self.path(kind, index), png_bytes(image))

    def save_record(self, index: int, record: Mapping) -> None:
        atomic_write_json(self.record_path(index), record)

    def records(self, indices: Iterable[int] | None = None) -> list[dict]:
        """The finished images' records, by index (all of them, or those in `indices`)."""
        folder = self.root / "records"
        if indices is None:
            files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        else:
            files = [self.record_path(i) for i in sorted(indices) if self.is_done(i)]
        return [json.loads(f.read_text()) for f in files]

    def write_metrics_csv(self, records: list[dict]) -> Path:
        """metrics.csv: one row per image, METRIC_COLUMNS; empty cells where a metric is unavailable."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for rec in records:
            writer.writerow({k: _cell(rec.get(k)) for k in METRIC_COLUMNS})
        path = self.root / "metrics.csv"
        atomic_write_text(path, buf.getvalue())
        return path

    def write_summary(self, summary: Mapping) -> Path:
        path = self.root / "summary.json"
        atomic_write_json(path, summary)
        return path


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _diff(before: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees, as 'key: old -> new'."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(before) | set(now)):
            out += _diff(before.get(k), now.get(k), f"{prefix}{k}.")
        return out
    if before != now:
        return [f"{prefix.rstrip('.')}: {before!r} -> {now!r}"]
    return []


def mean_std(records: list[dict], keys: Iterable[str]) -> dict:
    """{key: {'mean', 'std', 'n'}} over the records that have a number for the key (None when none do)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        out[k] = ({"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
                  if vals else None)
    return out

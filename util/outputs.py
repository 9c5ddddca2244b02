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
    metrics.csv          one row per finished image (rebuilt from records/ after every batch)
    summary.json         means, std, the resolved config, version, git commit, device

Every file is written to a temporary name in its folder and renamed into place, so an
interrupted run leaves no half-written file and loses at most the images in progress; the
temporary files a killed process leaves are removed by the next run. Outputs are numbered by
the image's position in the sorted file list, and each record names its file: a resume
whose folder no longer matches the records is refused.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from util.config import ConfigError
from util.files import atomic_write_bytes, atomic_write_text, remove_stale_temp_files, temp_path
from util.images import png_bytes

IMAGE_KINDS = ("input", "label", "recon", "recon_opt", "mask", "figures")
METRIC_COLUMNS = ("index", "file", "class_label",
                  "psnr_recon", "ssim_recon", "lpips_recon",
                  "psnr_recon_opt", "ssim_recon_opt", "lpips_recon_opt",
                  "psnr_measurement", "ssim_measurement", "lpips_measurement",
                  "psnr_baseline", "ssim_baseline", "lpips_baseline",
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

    def prepare(self, settings: Mapping, overwrite: bool, only: Iterable[int] | None = None,
                shared: bool = False) -> None:
        """Create the tree; with `overwrite` clear earlier outputs, else check they came from the same settings.

        `settings` is whatever determines the results (task, method, seed, model); a
        resumed run with different settings would mix two experiments, so it is refused.
        `only`: the images this run restores (None: the whole task); `overwrite` clears just
        those. If the settings changed, images outside `only` would keep outputs made with the
        old ones, so that is refused, unless `shared` (shards: the other processes redo theirs).
        Stale temporary files (from a killed run) are removed.
        """
        self._check_writable()
        run_file = self.root / "run.json"
        before = None
        if run_file.exists():
            try:
                before = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError):
                if not overwrite:
                    raise ConfigError(f"{run_file} is unreadable: pass --overwrite to start this task afresh") from None
        diffs = _diff(before, _jsonable(settings)) if before is not None else []
        shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
        if overwrite:
            if diffs and only is not None and not shared:
                left = sorted(set(self.done_indices()) - set(only))
                if left:
                    raise ConfigError(
                        f"the outputs in {self.root} were made with other settings ({shown}); --overwrite redoes "
                        f"only the {len(set(only))} image(s) selected, and {len(left)} finished image(s) "
                        f"({_span(left)}) would keep the old settings: drop --max_images to redo them all, "
                        f"or choose another --save_dir")
            self.clear(only)
        elif diffs:
            raise ConfigError(f"the outputs in {self.root} were made with other settings ({shown}); pass "
                              f"--overwrite to redo them, or choose another --save_dir")
        remove_stale_temp_files(self.root)
        atomic_write_json(run_file, settings)

    def _check_writable(self) -> None:
        """The task folder exists (created) and takes files; else a ConfigError naming the path."""
        for p in (self.root, *self.root.parents):
            if p.exists():
                if not p.is_dir():
                    raise ConfigError(f"{p} is a file, but the outputs need a folder there ({self.root}): "
                                      f"move the file or choose another --save_dir")
                break
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = temp_path(self.root / "run.json")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write the outputs to {self.root} ({e.strerror or e}): choose another "
                              f"--save_dir") from None

    def check_files(self, names: Sequence[str]) -> None:
        """Refuse to resume when a finished image's record names another file than the one now at its index.

        Outputs are numbered by position in the sorted file list: a file added or removed
        before others shifts them, and every later output would be paired with the wrong image.
        """
        wrong = []
        for i in self.done_indices():
            if i < len(names):
                recorded = self._read_record(self.record_path(i)).get("file")
                if recorded != names[i]:
                    wrong.append(f"{i:05d} was {recorded}, now {names[i]}")
        if wrong:
            raise ConfigError(
                f"the image folder changed since the outputs in {self.root} were made ({len(wrong)} image(s) moved: "
                f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}); outputs are numbered by position in "
                f"the sorted file list, so a file added or removed before others shifts them. Pass --overwrite to "
                f"redo the task with the folder as it is, or choose another --save_dir (new images whose names "
                f"sort after the existing ones resume without this)")

    def done_indices(self) -> list[int]:
        """The indices of the finished images (those with a record), sorted."""
        folder = self.root / "records"
        if not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit())

    @staticmethod
    def _read_record(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"{path} is unreadable: delete it (that image is then redone) or pass "
                              f"--overwrite") from None

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
        return [self._read_record(f) for f in files]

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


def _span(indices: Sequence[int]) -> str:
    """'1-5' for a run of consecutive indices, else the first few: '1, 3, 8 ...'."""
    if len(indices) > 1 and indices[-1] - indices[0] == len(indices) - 1:
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(str(i) for i in indices[:5]) + (" ..." if len(indices) > 5 else "")


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


BASELINE_LABELS = {"measurement": "measurement", "bicubic": "bicubic upsampling of y"}


def comparison(stats: Mapping, n: int, baseline: str | None, baseline_note: str) -> dict:
    """summary.json's `comparison`: mean PSNRs of the outputs, and the gain over the task's baseline.

    `baseline`: the name of the simple reference of this task ('measurement': the masked or
    blurred input; 'bicubic': bicubic upsampling of y; None: none, `baseline_note` says why).
    """
    def mean(k):
        return stats[k]["mean"] if stats.get(k) else None

    recon, base = mean("psnr_recon"), mean("psnr_baseline")
    return {"n": n, "psnr_recon": recon, "psnr_recon_opt": mean("psnr_recon_opt"),
            "psnr_measurement": mean("psnr_measurement"), "baseline": baseline, "baseline_note": baseline_note,
            "psnr_baseline": base,
            "psnr_gain_db": recon - base if recon is not None and base is not None else None}


def comparison_lines(comp: Mapping) -> list[str]:
    """What the CLI prints at the end: mean PSNRs and the gain over the baseline (or why there is none)."""
    if comp["psnr_recon"] is None:
        return []
    line = f"mean PSNR over {comp['n']} images: reconstruction {comp['psnr_recon']:.2f} dB"
    if comp["psnr_recon_opt"] is not None:
        line += f", refined {comp['psnr_recon_opt']:.2f} dB"
    if comp["psnr_baseline"] is not None:
        label = BASELINE_LABELS.get(comp["baseline"], comp["baseline"])
        line += f", {label} {comp['psnr_baseline']:.2f} dB ({comp['psnr_gain_db']:+.2f} dB)"
        return [line]
    return [line, comp["baseline_note"]]

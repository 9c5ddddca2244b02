"""The table of a grid run (`scripts/reproduce.py`): what the cells on disk hold, beside published numbers.

Per cell (entry, task) and output (`recon`, `recon_opt`): mean and std over the finished
images of PSNR, SSIM and LPIPS (from the per-image records the CLI wrote), FID of the
reconstructions against the ground truth (pytorch-fid, `scripts/evaluate.py`; only where
its Inception weights are on disk and the cell is complete), seconds of sampling per image
(the records' `seconds`), and the peak memory the runner measured around the cell. A value
that cannot be given says why in its cell, with the full reason in a note; nothing is
computed from random weights. `table.csv` has one row per cell and output, `table.md` one
table per task and a list of the missing or incomplete cells.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

from util.files import atomic_write_text
from util.grid import PROJECT_ROOT, Cell, GridError
from util.outputs import mean_std

METRICS = (("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("lpips", "LPIPS", "{:.3f}"))
PUBLISHED_METRICS = ("psnr", "ssim", "lpips", "fid", "seconds", "memory_gb")
CSV_COLUMNS = ("entry", "method", "settings", "task", "output", "status", "images", "expected",
               "psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "lpips_mean", "lpips_std", "lpips_note",
               "fid", "fid_images", "fid_note", "seconds_mean", "seconds_std", "wall_seconds_per_image",
               "peak_memory_mb", "memory_kind",
               *(f"published_{m}{s}" for m in PUBLISHED_METRICS for s in ("", "_source")), "cell_dir")
MEMORY_NAMES = {"cuda_max_memory_allocated": "CUDA max_memory_allocated", "peak_rss": "peak RSS",
                "peak_rss_since_process_start": "peak RSS since process start"}


def load_published(path: str | Path, section: str | None) -> dict:
    """{entry: {task: {metric: {'value', 'source'}}}} of `section` in published.yaml (empty if none)."""
    from util.config import load_yaml

    if section is None or not Path(path).is_file():
        return {}
    data = (load_yaml(path).get(section) or {})
    for entry, tasks in data.items():
        for task, metrics in (tasks or {}).items():
            for metric, item in (metrics or {}).items():
                if metric not in PUBLISHED_METRICS:
                    raise GridError(f"{path}: {section}.{entry}.{task}.{metric}: unknown metric; "
                                    f"use {', '.join(PUBLISHED_METRICS)}")
                if not (isinstance(item, dict) and isinstance(item.get("value"), (int, float))
                        and item.get("source")):
                    raise GridError(f"{path}: {section}.{entry}.{task}.{metric} must be "
                                    f"{{value: NUMBER, source: 'paper, Table N'}}")
    return data


def read_records(cell: Cell) -> list[dict]:
    """The cell's finished images (index < cell.expected when known), by index."""
    folder = cell.dir / "records"
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("[0-9]*.json")):
        rec = json.loads(path.read_text())
        if cell.expected is None or rec["index"] < cell.expected:
            out.append(rec)
    return out


def runner_sessions(cell: Cell) -> list[dict]:
    sessions = []
    for path in sorted((cell.dir / "runner").glob("rank*.json")):
        sessions += json.loads(path.read_text()).get("sessions", [])
    return sessions


def lpips_reason(cell: Cell) -> str:
    """Why a cell has no LPIPS values: the run's own note (summary.json), else the weights check now."""
    later = " With the file in place, --aggregate_only computes LPIPS from the saved PNGs."
    summary = cell.dir / "summary.json"
    if summary.is_file():
        note = json.loads(summary.read_text()).get("lpips") or ""
        if note.startswith("unavailable"):
            return "LPIPS " + note + later
    return "LPIPS not recorded by the run (its backbone weights were missing when it ran)." + later


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("_evaluate", PROJECT_ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell_fid(cell: Cell, outputs: Iterable[str], complete: bool, compute: bool, device="cpu") -> dict:
    """{output: (FID or None, images, note)}: from the cell's fid.json when it covers the cell's
    images, else computed (and fid.json written) when `compute`, the cell is complete and the
    Inception weights are on disk; otherwise None with the reason."""
    from util.metrics import FID_INCEPTION_URL, MissingWeightsError, hub_checkpoint

    outputs = [o for o in outputs if (cell.dir / o).is_dir()]
    counts = {o: sum(1 for _ in (cell.dir / o).glob("*.png")) for o in outputs}
    if not outputs:
        return {}
    if not complete:
        return {o: (None, counts[o], "FID: the cell is incomplete") for o in outputs}
    if min(counts.values()) < 2:
        return {o: (None, counts[o], "FID needs at least 2 images") for o in outputs}
    path = cell.dir / "fid.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if not (saved.get("reportable") and all(saved.get(f"n_{o}") == counts[o] and f"fid_{o}" in saved
                                           for o in outputs)):
        try:
            hub_checkpoint(FID_INCEPTION_URL, "FID")
        except MissingWeightsError as e:
            return {o: (None, counts[o], str(e)) for o in outputs}
        if not compute:
            return {o: (None, counts[o], "FID not computed (--skip_fid)") for o in outputs}
        saved = _evaluate_module().evaluate_fid(cell.dir, which=outputs, device=device)
    return {o: (saved[f"fid_{o}"], saved[f"n_{o}"], None) for o in outputs}


LPIPS_FROM_PNGS = ("LPIPS(alex) computed after the run from its saved 8-bit PNGs (scripts/evaluate.py "
                   "--metrics lpips, lpips.json); the run had no LPIPS weights while it sampled")


def cell_lpips(cell: Cell, output: str, records: list[dict], complete: bool, device="cpu") -> dict | None:
    """{png name: LPIPS} of `output` for every finished image, from the cell's lpips.json; computed
    (and lpips.json written) when the cell is complete, the file does not cover it and the
    LPIPS(alex) weights are on disk. None when neither is possible."""
    from util.metrics import ALEXNET_URL, MissingWeightsError, hub_checkpoint

    names = [f"{r['index']:05d}.png" for r in records]
    path = cell.dir / "lpips.json"

    def covered(saved):
        values = saved.get(f"lpips_{output}") or {}
        return saved.get("reportable") and all(n in values for n in names)

    saved = json.loads(path.read_text()) if path.is_file() else {}
    if not covered(saved):
        if not complete or not (cell.dir / output).is_dir():
            return None
        try:
            hub_checkpoint(ALEXNET_URL, "LPIPS(alex)")
        except MissingWeightsError:
            return None
        outputs = [o for o in ("recon", "recon_opt") if (cell.dir / o).is_dir()]
        saved = _evaluate_module().evaluate_lpips(cell.dir, which=outputs, device=device)
        if not covered(saved):
            return None
    return {n: saved[f"lpips_{output}"][n] for n in names}


def cell_rows(cell: Cell, outputs: Iterable[str], published: Mapping, not_registered: Mapping[str, str],
              fid: bool = True, device="cpu") -> list[dict]:
    """The CSV rows of one cell: one per output present (recon always)."""
    base = {"entry": cell.entry.name, "method": cell.entry.method, "task": cell.task,
            "settings": ", ".join(f"{k}={v}" for k, v in cell.entry.settings.items()),
            "expected": cell.expected, "cell_dir": str(cell.dir)}
    if cell.entry.name in not_registered:
        return [{**base, "output": "recon", "images": 0, "status": not_registered[cell.entry.name]}]
    records = read_records(cell)
    sessions = runner_sessions(cell)
    errors = [s["error"] for s in sessions if s.get("error")]
    n = len(records)
    if cell.expected is None:
        status = "unknown: the data folder is not here to count the images"
    elif n >= cell.expected:
        status = "done"
    elif n == 0:
        status = f"failed: {errors[-1]}" if errors else "missing"
    else:
        status = f"partial ({n} of {cell.expected})" + (f"; failed: {errors[-1]}" if errors else "")
    computed = [s for s in sessions if s.get("images_computed")]
    peak = max(computed, key=lambda s: s.get("peak_memory_bytes") or 0) if computed else None
    images_computed = sum(s["images_computed"] for s in computed)
    base.update(status=status, images=n,
                wall_seconds_per_image=(sum(s["wall_seconds"] for s in computed) / images_computed
                                        if images_computed else None),
                peak_memory_mb=peak["peak_memory_bytes"] / 2 ** 20 if peak and peak.get("peak_memory_bytes") else None,
                memory_kind=peak["memory_kind"] if peak else None)
    seconds = mean_std(records, ["seconds"])["seconds"]
    if seconds:
        base.update(seconds_mean=seconds["mean"], seconds_std=seconds["std"])
    present = [o for o in outputs if o == "recon" or any(f"psnr_{o}" in r for r in records)]
    fids = cell_fid(cell, present, complete=status == "done", compute=fid, device=device) if n else {}
    rows = []
    for k, output in enumerate(present):
        row = dict(base, output=output)
        stats = mean_std(records, [f"{m}_{output}" for m, _, _ in METRICS])
        for m, _, _ in METRICS:
            s = stats[f"{m}_{output}"]
            if s:
                row.update({f"{m}_mean": s["mean"], f"{m}_std": s["std"]})
        if n and not stats[f"lpips_{output}"]:
            values = cell_lpips(cell, output, records, complete=status == "done", device=device)
            if values:
                s = mean_std([{"lpips": v} for v in values.values()], ["lpips"])["lpips"]
                row.update(lpips_mean=s["mean"], lpips_std=s["std"], lpips_note=LPIPS_FROM_PNGS)
            else:
                row["lpips_note"] = lpips_reason(cell)
        if output in fids:
            row["fid"], row["fid_images"], row["fid_note"] = fids[output]
        if k == 0:  # the paper's numbers once per cell
            for metric, item in (published.get(cell.entry.name, {}).get(cell.task) or {}).items():
                row[f"published_{metric}"], row[f"published_{metric}_source"] = item["value"], item["source"]
        rows.append(row)
    return rows


def _fmt(value, fmt="{:.3g}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return fmt.format(value) if isinstance(value, float) else str(value)


def write_csv(rows: list[dict], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k), "{:.6g}") for k in CSV_COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return path


class _Notes:
    """Numbered notes under a table: the same text gets the same number."""

    def __init__(self):
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def _short(reason: str) -> str:
    low = reason.lower()
    if "weights" in low:
        return "no weights"
    if "incomplete" in low:
        return "incomplete"
    if "not computed" in low:
        return "not computed"
    return "n/a"


def _md_row(row: dict, notes: _Notes) -> list[str]:
    cells = []
    for m, _, fmt in METRICS:
        if row.get(f"{m}_mean") is not None:
            note = f" {notes.ref(row[f'{m}_note'])}" if row.get(f"{m}_note") else ""
            cells.append(f"{fmt.format(row[f'{m}_mean'])} ± {fmt.format(row[f'{m}_std'])}{note}")
        elif row.get(f"{m}_note"):
            cells.append(f"{_short(row[f'{m}_note'])} {notes.ref(row[f'{m}_note'])}")
        else:
            cells.append("")
    if row.get("fid") is not None:
        cells.append(f"{row['fid']:.2f} (n={row['fid_images']})")
    elif row.get("fid_note"):
        cells.append(f"{_short(row['fid_note'])} {notes.ref(row['fid_note'])}")
    else:
        cells.append("")
    cells.append(f"{row['seconds_mean']:.3g} ± {row['seconds_std']:.2g}" if row.get("seconds_mean") is not None else "")
    if row.get("peak_memory_mb") is not None:
        kind = MEMORY_NAMES.get(row["memory_kind"], row["memory_kind"])
        ref = notes.ref(f"peak memory: {kind}, the largest over the processes and runs that computed images "
                        f"of the cell, measured by the runner around the cell (model loading included)")
        cells.append(f"{row['peak_memory_mb'] / 1024:.2f} GB {ref}")
    else:
        cells.append("")
    paper = [f"{m.upper() if m != 'memory_gb' else 'GB'} {_fmt(row[f'published_{m}'])} "
             f"{notes.ref(row[f'published_{m}_source'])}"
             for m in PUBLISHED_METRICS if row.get(f"published_{m}") is not None]
    cells.append("; ".join(paper))
    return cells


def markdown(rows: list[dict], title: str, description: str, task_configs: Mapping[str, str],
             context: str = "") -> tuple[str, list[str]]:
    """table.md's text and the list of missing or incomplete cells."""
    out = [f"# {title}", ""]
    if description:
        out += [description, ""]
    out += ["Mean ± std over the images of each cell: PSNR (dB) and SSIM on [0, 1], LPIPS(alex); FID of the "
            "reconstructions against the ground truth (pytorch-fid, over the n images of the cell); seconds of "
            "sampling per image (the CLI's per-image record); peak memory per process during the cell. "
            "`recon` is the method's output, `recon_opt` the refined one where the method refines. "
            "'paper': the numbers the papers report (configs/grids/published.yaml).", ""]
    if context:
        out += [context, ""]
    missing = []
    for task in dict.fromkeys(r["task"] for r in rows):
        notes = _Notes()
        out += [f"## {task}", "", f"Task config: `{task_configs.get(task, '?')}`", "",
                "| entry | method | settings | output | images | PSNR | SSIM | LPIPS | FID | s / image | "
                "peak memory | paper |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        previous = None
        for row in (r for r in rows if r["task"] == task):
            images = f"{row['images']}/{_fmt(row.get('expected')) or '?'}"
            if row["status"] != "done":
                images += f" {notes.ref(row['entry'] + ': ' + row['status'])}"
            cells = [row["entry"], row["method"], row["settings"], row["output"], images, *_md_row(row, notes)]
            if row["entry"] == previous:  # the cell's second output: its per-cell columns are shown once
                cells = ["", "", "", row["output"], "", *cells[5:9], "", "", ""]
            previous = row["entry"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out += [f"{i + 1}. {text}" for i, text in enumerate(notes.texts)] + [""]
    seen = set()
    for row in rows:
        key = (row["entry"], row["task"])
        if row["status"] != "done" and key not in seen:
            seen.add(key)
            missing.append(f"{row['entry']}/{row['task']}: {row['status']} ({row['cell_dir']})")
    out += ["## Missing or incomplete cells", ""]
    out += [f"- {m}" for m in missing] or ["None: every cell holds all its images."]
    out.append("")
    return "\n".join(out), missing


def aggregate(cells: list[Cell], save_dir: Path, title: str, description: str = "", outputs=("recon", "recon_opt"),
              published: Mapping | None = None, not_registered: Mapping[str, str] | None = None,
              fid: bool = True, device="cpu", context: str = "") -> tuple[Path, Path, list[str]]:
    """Write save_dir/table.md and save_dir/table.csv from the cells on disk; return them and the
    missing or incomplete cells."""
    rows = [row for cell in cells
            for row in cell_rows(cell, outputs, published or {}, not_registered or {}, fid=fid, device=device)]
    text, missing = markdown(rows, title, description, {c.task: c.task_config for c in cells}, context)
    save_dir.mkdir(parents=True, exist_ok=True)
    md = save_dir / "table.md"
    atomic_write_text(md, text)
    return md, write_csv(rows, save_dir / "table.csv"), missing

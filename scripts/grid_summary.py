"""Compact views of a finished grid (scripts/reproduce.py): PSNR and cell wall time per entry and task.

    python scripts/grid_summary.py results/grid-demo

Reads SAVE_DIR/table.csv (rewritten by `scripts/reproduce.py --aggregate_only` if needed), the
baseline of each task from a cell's summary.json (the masked or blurred input, bicubic
upsampling for super-resolution) and each cell's runner files (wall time of the cell: the
longest of its processes, summed over resumed sessions). Prints markdown: one table of PSNR
(reconstruction / refined, dB), one of SSIM, one of wall seconds per cell, and with
`--against ENTRY` the per-image PSNR difference of every entry's reconstruction to ENTRY's on
the same images (mean +- its standard error; the cells' metrics.csv), and the same for the
final outputs (refined where a method refines).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path


def load(save_dir: Path):
    with open(save_dir / "table.csv") as f:
        rows = list(csv.DictReader(f))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    cells = defaultdict(dict)
    for r in rows:
        cells[(r["entry"], r["task"])][r["output"]] = r
    return tasks, entries, cells


def baseline(cells, task, entries) -> str:
    for e in entries:
        cell = cells[(e, task)].get("recon")
        summary = Path(cell["cell_dir"]) / "summary.json" if cell else None
        if summary and summary.is_file():
            comp = json.loads(summary.read_text()).get("comparison", {})
            if comp.get("psnr_baseline") is not None:
                return f"{comp['baseline']}: {comp['psnr_baseline']:.2f}"
    return ""


def wall_seconds(cell_dir: Path) -> float | None:
    per_rank = []
    for f in sorted((cell_dir / "runner").glob("rank*.json")):
        per_rank.append(sum(s["wall_seconds"] for s in json.loads(f.read_text())["sessions"]))
    return max(per_rank) if per_rank else None


def table(tasks, entries, value, head: str = "entry") -> str:
    """One row per entry, one column per task: value(cell of (entry, task))."""
    lines = [f"| {head} | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for e in entries:
        lines.append(f"| {e} | " + " | ".join(value(e, t) for t in tasks) + " |")
    return "\n".join(lines)


def number(cell, output, key, fmt):
    row = cell.get(output)
    return fmt.format(float(row[key])) if row and row.get(key) else ""


def per_image_psnr(cell_dir: Path, final: bool) -> dict:
    """{file: PSNR} of the reconstruction, or with `final` of the refined one where the method refines."""
    with open(cell_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    column = "psnr_recon_opt" if final and any(r.get("psnr_recon_opt") for r in rows) else "psnr_recon"
    return {r["file"]: float(r[column]) for r in rows if r.get(column)}


def paired(cell, ref, final: bool = False) -> str:
    """Mean +- standard error of the per-image PSNR difference cell - ref on the same images."""
    if not cell.get("recon") or not ref.get("recon"):
        return ""
    a = per_image_psnr(Path(cell["recon"]["cell_dir"]), final)
    b = per_image_psnr(Path(ref["recon"]["cell_dir"]), final)
    d = [a[k] - b[k] for k in a if k in b]
    if len(d) < 2:
        return ""
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    return f"{mean:+.2f} +- {se:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("save_dir", type=Path)
    p.add_argument("--against", default=None, help="an entry: per-image PSNR differences to it")
    args = p.parse_args(argv)
    tasks, entries, cells = load(args.save_dir)

    def psnr(e, t):
        cell = cells[(e, t)]
        a, b = number(cell, "recon", "psnr_mean", "{:.2f}"), number(cell, "recon_opt", "psnr_mean", "{:.2f}")
        return f"{a} / {b}" if b else a

    def ssim(e, t):
        cell = cells[(e, t)]
        a, b = number(cell, "recon", "ssim_mean", "{:.3f}"), number(cell, "recon_opt", "ssim_mean", "{:.3f}")
        return f"{a} / {b}" if b else a

    def wall(e, t):
        row = cells[(e, t)].get("recon")
        w = wall_seconds(Path(row["cell_dir"])) if row else None
        return "" if w is None else f"{w:.0f}"

    print("PSNR (dB), mean over the images: reconstruction / refined where the method refines\n")
    print(table(tasks, entries, psnr))
    print("| baseline | " + " | ".join(baseline(cells, t, entries) for t in tasks) + " |")
    print("\nSSIM, reconstruction / refined\n")
    print(table(tasks, entries, ssim))
    print("\nWall seconds per cell (its images shared among the processes; the longest process)\n")
    print(table(tasks, entries, wall))
    if args.against:
        if args.against not in entries:
            raise SystemExit(f"error: --against {args.against}: not an entry of this grid ({', '.join(entries)})")
        print(f"\nPSNR of the reconstruction minus {args.against}'s, per image (dB, mean +- standard error)\n")
        others = [e for e in entries if e != args.against]
        print(table(tasks, others, lambda e, t: paired(cells[(e, t)], cells[(args.against, t)])))
        print(f"\nThe same for the final outputs (the refined reconstruction where a method refines, else its "
              f"reconstruction) minus {args.against}'s final output\n")
        print(table(tasks, others, lambda e, t: paired(cells[(e, t)], cells[(args.against, t)], final=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a grid of methods x tasks (configs/grids/<name>.yaml), then write one table of the results.

    python scripts/reproduce.py --grid demo --save_dir results/grid-demo                  # CPU, the demo model
    torchrun --nproc_per_node 8 scripts/reproduce.py --grid paper-ffhq --save_dir results/paper-ffhq \\
        data.root=path/to/ffhq                                                           # one process per GPU
    python scripts/reproduce.py --grid demo --save_dir results/grid-demo --aggregate_only  # tables only

Every cell (entry, task) is one `sample_condition.py` run, called in this process, written to
SAVE_DIR/<entry>/<method>/<task>/. Under torchrun (or srun: SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID) every process takes the images i with i mod WORLD_SIZE = RANK of every cell,
on cuda:LOCAL_RANK (else the CPU); the processes meet once, at the end (torch.distributed:
NCCL on GPUs, Gloo on the CPU), and rank 0 writes SAVE_DIR/table.md and SAVE_DIR/table.csv.
A rerun of the same command resumes: a finished image (its record) is never recomputed, and
a cell whose images are all done is not even loaded. Console output of the cells goes to
SAVE_DIR/logs/rank<K>.log; the console shows one progress line per process.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from util.grid import (PUBLISHED_FILE, Cell, GridError, PeakMemory, Ranks, build_cells, load_grid,  # noqa: E402
                       narrow, ranks_from_env, unregistered)
from util.grid_run import Group, LogStream, Progress  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", required=True, help="a grid of configs/grids/ (demo, demo-steps, paper-ffhq, "
                                                 "paper-imagenet) or the path of a grid YAML")
    p.add_argument("--methods", default=None, help="comma-separated grid entries (or method names: all their "
                                                   "entries) to run; default: all")
    p.add_argument("--tasks", default=None, help="comma-separated task names to run; default: all")
    p.add_argument("--max_images", type=int, default=None, help="the first this many images of each task "
                                                                "(default: the grid's max_images)")
    p.add_argument("--save_dir", required=True, help="cells go to SAVE_DIR/<entry>/<method>/<task>/, tables "
                                                     "to SAVE_DIR/table.md and table.csv")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK when CUDA is there, "
                                                  "else cpu)")
    p.add_argument("--seed", type=int, default=42, help="sample_condition.py --seed (default 42)")
    p.add_argument("--batch_size", type=int, default=None, help="sample_condition.py --batch_size "
                                                                "(default: the task's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--no_figures", action="store_true", help="skip the per-image figures")
    p.add_argument("--skip_unregistered", action="store_true",
                   help="run the entries whose method is registered and list the others in the table "
                        "(default: an error naming them)")
    p.add_argument("--aggregate_only", action="store_true", help="only rebuild the tables from what is on disk")
    p.add_argument("--skip_fid", action="store_true", help="do not compute missing FIDs (they need the "
                                                           "Inception weights; see util/metrics.py)")
    p.add_argument("--published", default=str(PUBLISHED_FILE), help="published numbers (YAML)")
    p.add_argument("--list", action="store_true", help="print the cells and exit")
    p.add_argument("--barrier_timeout_h", type=float, default=72.0,
                   help="hours a finished process waits at the end for the others (default 72)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides for every cell, e.g. data.root=path; sampler.KEY=value goes to the "
                        "entries whose method has KEY (and wins over the grid's settings)")
    return p


def pick_device(name: str | None, ranks: Ranks):
    import torch

    if name in (None, "cuda"):
        if torch.cuda.is_available():
            return torch.device(f"cuda:{ranks.local_rank % torch.cuda.device_count()}")
        if name == "cuda":
            raise GridError("--device cuda: torch sees no CUDA device; use --device cpu")
        return torch.device("cpu")
    return torch.device(name)


def _append_session(path: Path, session: dict) -> None:
    from util.outputs import atomic_write_json

    data = json.loads(path.read_text()) if path.is_file() else {"sessions": []}
    data["sessions"].append(session)
    atomic_write_json(path, data)


def run_cell(cell: Cell, ranks: Ranks, flags: list[str], device, log) -> dict:
    """Restore this process's images of `cell` that are not done yet; return the session record."""
    import sample_condition

    mine = ranks.mine(cell.expected)
    before = len(cell.done(mine))
    argv = cell.argv(["--shard", f"{ranks.rank}/{ranks.world}", "--device", str(device),
                      "--max_images", str(cell.expected), *flags])
    log.write(f"\n=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {cell.label}: sample_condition.py "
              f"{' '.join(argv)}\n")
    log.flush()
    stream, error, t0 = LogStream(log), None, time.time()
    with PeakMemory(device) as memory:
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                rc = sample_condition.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # noqa: BLE001 - any failure of one cell is recorded, the grid goes on
            rc, error = 1, f"{type(e).__name__}: {e}"
            log.write(traceback.format_exc())
    stream.write("\n")
    log.flush()
    if rc == 130:
        raise KeyboardInterrupt
    if rc != 0 and error is None:
        error = stream.error() or f"sample_condition.py exited with code {rc} (see the log)"
    after = len(cell.done(mine))
    session = {"started": datetime.datetime.fromtimestamp(t0).isoformat(timespec="seconds"),
               "wall_seconds": time.time() - t0, "images_computed": after - before, "images_done": after,
               "images_of_this_process": len(mine), "device": str(device), "peak_memory_bytes": memory.bytes,
               "memory_kind": memory.kind, "exit_code": rc, "error": error}
    _append_session(cell.runner_file(ranks.rank, ranks.world), session)
    return session


def refresh_summaries(cells: list[Cell], flags: list[str], device, log) -> None:
    """Rank 0, after all processes finished: a complete cell whose summary.json misses images (two
    processes ended at once) gets it rewritten by the CLI, which then has nothing left to compute."""
    import sample_condition

    for cell in cells:
        path = cell.dir / "summary.json"
        if cell.expected is None or len(cell.done(range(cell.expected))) < cell.expected:
            continue
        if path.is_file() and json.loads(path.read_text()).get("images") == cell.expected:
            continue
        stream = LogStream(log)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                sample_condition.main(cell.argv(["--shard", "0/1", "--device", str(device), "--max_images",
                                                 str(cell.expected), *flags]))
        except Exception:  # noqa: BLE001 - the table reads the records, not summary.json
            log.write(traceback.format_exc())


def common_flags(args) -> list[str]:
    flags = ["--seed", str(args.seed)]
    if args.batch_size is not None:
        flags += ["--batch_size", str(args.batch_size)]
    if args.threads is not None:
        flags += ["--threads", str(args.threads)]
    if args.no_figures:
        flags.append("--no_figures")
    return flags


def with_manifest(cells: list[Cell], save_dir: Path) -> list[Cell]:
    """Fill the image counts of cells whose data folder is not here from the run's grid.json."""
    import dataclasses

    path = save_dir / "grid.json"
    if not path.is_file() or all(c.expected is not None for c in cells):
        return cells
    known = {c["label"]: c["expected"] for c in json.loads(path.read_text()).get("cells", [])}
    return [c if c.expected is not None else dataclasses.replace(c, expected=known.get(c.label)) for c in cells]


def tables(args, grid, cells, missing_methods, device, context) -> int:
    from util.grid_table import aggregate, load_published

    save_dir = Path(args.save_dir)
    md, csv_path, missing = aggregate(
        with_manifest(cells, save_dir), save_dir, title=f"Grid {grid.name}", description=grid.description,
        outputs=grid.outputs, published=load_published(args.published, grid.published),
        not_registered={e: f"not registered: method {grid.entries[e].method!r} is not in "
                           f"guided_diffusion.methods" for e in missing_methods},
        fid=not args.skip_fid, device=device, context=context)
    print(f"tables: {md} and {csv_path}")
    if missing:
        print(f"{len(missing)} cell(s) missing or incomplete:")
        for line in missing:
            print(f"  {line}")
    return len(missing)


def run_context(grid, save_dir: Path, ranks: Ranks, device, aggregate_only: bool) -> str:
    """One line for table.md: the grid file, the layout, which processes ran it (every run so far), the commit."""
    from util.logging import git_commit

    path = grid.path.relative_to(PROJECT_ROOT) if grid.path.is_relative_to(PROJECT_ROOT) else grid.path
    manifest = save_dir / "grid.json"
    runs = json.loads(manifest.read_text()).get("runs", []) if manifest.is_file() else []
    if not aggregate_only:
        runs.append({"world_size": ranks.world, "launcher": ranks.launcher})
    who = ", then ".join(dict.fromkeys(f"{r['world_size']} process(es) ({r['launcher']})" for r in runs)) or "?"
    return (f"Grid file `{path}`; cells in `{save_dir}/<entry>/<method>/<task>/`; run by {who}; device "
            f"{device.type}; git {git_commit()}; tables written {datetime.datetime.now():%Y-%m-%d %H:%M}"
            f"{' (--aggregate_only)' if aggregate_only else ''}.")


def write_manifest(path: Path, grid, cells: list[Cell], ranks: Ranks, args) -> None:
    """SAVE_DIR/grid.json: the grid, its cells and their image counts, and every run made in the folder."""
    from util.logging import git_commit
    from util.outputs import atomic_write_json

    runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    runs.append({"started": datetime.datetime.now().isoformat(timespec="seconds"), "world_size": ranks.world,
                 "launcher": ranks.launcher, "git_commit": git_commit(), "args": vars(args)})
    atomic_write_json(path, {"grid": grid.name, "grid_file": str(grid.path), "runs": runs,
                             "cells": [{"label": c.label, "dir": str(c.dir), "expected": c.expected}
                                       for c in cells]})


def run(args) -> int:
    grid = narrow(load_grid(args.grid), args.methods, args.tasks)
    if args.max_images is not None and args.max_images < 1:
        raise GridError(f"--max_images must be >= 1, got {args.max_images}")
    missing_methods = unregistered(grid)
    if missing_methods and not (args.skip_unregistered or args.aggregate_only or args.list):
        from guided_diffusion.methods import available_methods
        raise GridError(f"grid {grid.name}: method(s) not registered: "
                        f"{', '.join(sorted({grid.entries[e].method for e in missing_methods}))} (entries "
                        f"{', '.join(missing_methods)}); registered: {', '.join(available_methods())}. Narrow "
                        f"the grid with --methods, or pass --skip_unregistered to run the others")
    cells = build_cells(grid, args.save_dir, args.overrides, args.max_images)
    ranks = ranks_from_env()
    device = pick_device(args.device, ranks)
    save_dir = Path(args.save_dir)
    context = run_context(grid, save_dir, ranks, device, args.aggregate_only)
    if args.list:
        for cell in cells:
            note = " (method not registered)" if cell.entry.name in missing_methods else ""
            print(f"{cell.label:45s} {cell.expected if cell.expected is not None else '?':>5} images  "
                  f"{cell.dir}{note}")
        return 0
    if args.aggregate_only:
        return 1 if tables(args, grid, cells, missing_methods, device, context) else 0

    runnable = [c for c in cells if c.entry.name not in missing_methods]
    absent = [c for c in runnable if c.expected is None]
    if absent:
        raise GridError(f"task {absent[0].task}: its image folder {absent[0].data_root} does not exist or holds no "
                        f"images; give yours with data.root=path/to/images")
    group = Group(ranks, device, args.barrier_timeout_h)
    try:
        if ranks.rank == 0:
            write_manifest(save_dir / "grid.json", grid, cells, ranks, args)
        flags = common_flags(args)
        (save_dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(save_dir / "logs" / f"rank{ranks.rank}.log", "a") as log:
            failures = run_cells(runnable, ranks, flags, device, log)
            group.barrier()  # the processes meet once, when all have finished their images
            failures = group.total(failures)
            if ranks.rank == 0:
                refresh_summaries(runnable, flags, device, log)
                tables(args, grid, cells, missing_methods, device, context)
        group.barrier()  # and wait for the tables, so that none ends the launch before they are written
    finally:
        group.close()
    if failures:
        print(f"rank {ranks.rank}: {failures} cell run(s) failed (all processes); see {save_dir}/logs/ and "
              f"{save_dir}/table.md", file=sys.stderr)
    return 1 if failures else 0


def run_cells(cells: list[Cell], ranks: Ranks, flags: list[str], device, log) -> int:
    """Run this process's share of every cell, in grid order; return how many cell runs failed."""
    plan = [(c, ranks.mine(c.expected)) for c in cells]
    progress = Progress(ranks, plan, sys.stderr)
    failures = 0
    try:
        for k, (cell, mine) in enumerate(plan):
            if len(cell.done(mine)) == len(mine):
                continue  # nothing left: not even the model is loaded
            with progress.watch(k, cell, mine):
                session = run_cell(cell, ranks, flags, device, log)
            if session["error"]:
                failures += 1
                progress.write(f"rank {ranks.rank}: {cell.label} failed: {session['error']}")
    finally:
        progress.close()
    return failures


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 1 a cell failed (the grid went on; the table says which), 2 a user error."""
    from guided_diffusion.methods import MethodError
    from util.config import ConfigError

    args = build_parser().parse_intermixed_args(argv)
    try:
        return run(args)
    except (ConfigError, MethodError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

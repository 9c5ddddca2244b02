"""Grids of methods x tasks for `scripts/reproduce.py`: the grid YAML, its cells, ranks, peak memory.

A grid (`configs/grids/<name>.yaml`) names tasks (task configs) and method entries. An entry
is a registered method with optional settings, so one method can appear in several variants::

    tasks:
      inpainting_box: configs/tasks/demo/inpainting_config.yaml    # key = the task's `name`
    methods:
      ldps: {}                                                     # the method with its defaults
      ld_smc_n4_exact: {method: ld_smc, settings: {num_particles: 4, preset: exact}}

Each entry is one `sample_condition.py` save folder: cell (entry, task) is written by
`sample_condition.py --method <method> --save_dir DIR/<entry>` into
`DIR/<entry>/<method>/<task>/`, so variants of a method never share a folder.
"""
from __future__ import annotations

import dataclasses
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from util.config import ConfigError, load_yaml, parse_override

PROJECT_ROOT = Path(__file__).resolve().parents[1]
GRID_DIR = PROJECT_ROOT / "configs" / "grids"
PUBLISHED_FILE = GRID_DIR / "published.yaml"
OUTPUTS = ("recon", "recon_opt")
_GRID_KEYS = {"description", "published", "max_images", "overrides", "outputs", "tasks", "methods"}


class GridError(ConfigError):
    """A grid file, a --methods / --tasks name or an override that does not fit; the message says which."""


@dataclass(frozen=True)
class Entry:
    """One row group of the table: a registered `method` with `settings` (its config fields)."""
    name: str
    method: str
    settings: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    description: str
    tasks: Mapping[str, str]          # task name -> task config path
    entries: Mapping[str, Entry]
    max_images: int | None = None
    overrides: tuple = ()             # dotted overrides for every cell
    published: str | None = None      # section of published.yaml
    outputs: tuple = OUTPUTS


def available_grids() -> list[str]:
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml") if p.name != PUBLISHED_FILE.name)


def grid_path(name: str) -> Path:
    """configs/grids/<name>.yaml, or `name` itself when it is a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = GRID_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GridError(f"no grid {name!r}: choose one of {', '.join(available_grids())} (configs/grids/), "
                        f"or give the path of a grid YAML")
    return path


def load_grid(name: str) -> Grid:
    """Read and check a grid YAML (keys, entry layout); method names are checked later (`check_methods`)."""
    path = grid_path(name)
    raw = load_yaml(path)
    unknown = set(raw) - _GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_GRID_KEYS)}")
    tasks = raw.get("tasks") or {}
    methods = raw.get("methods") or {}
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(v, str) for v in tasks.values()):
        raise GridError(f"{path}: 'tasks' must map task names to task config paths")
    if not isinstance(methods, dict) or not methods:
        raise GridError(f"{path}: 'methods' must map entry names to {{method: NAME, settings: {{...}}}} (or {{}})")
    entries = {}
    for key, spec in methods.items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"method", "settings"}:
            raise GridError(f"{path}: methods.{key} must be a mapping with 'method' and/or 'settings', got {spec!r}")
        settings = spec.get("settings") or {}
        if not isinstance(settings, dict):
            raise GridError(f"{path}: methods.{key}.settings must be a mapping, got {settings!r}")
        if "/" in str(key) or str(key) in ("", ".", ".."):
            raise GridError(f"{path}: methods.{key}: an entry name must be a plain folder name")
        entries[str(key)] = Entry(str(key), str(spec.get("method", key)), dict(settings))
    outputs = tuple(raw.get("outputs") or OUTPUTS)
    if set(outputs) - set(OUTPUTS):
        raise GridError(f"{path}: outputs must be among {OUTPUTS}, got {list(outputs)}")
    return Grid(name=path.stem, path=path, description=str(raw.get("description", "")).strip(),
                tasks={str(k): v for k, v in tasks.items()}, entries=entries, max_images=raw.get("max_images"),
                overrides=tuple(raw.get("overrides") or ()), published=raw.get("published"), outputs=outputs)


def narrow(grid: Grid, methods: str | None = None, tasks: str | None = None) -> Grid:
    """The grid restricted to comma-separated entry names / task names (unknown names are an error).

    A --methods name is an entry name, else a method name (then every entry of that method).
    """
    entries, task_map = dict(grid.entries), dict(grid.tasks)
    if methods:
        chosen = {}
        for name in (n.strip() for n in methods.split(",") if n.strip()):
            hits = ({name: grid.entries[name]} if name in grid.entries else
                    {k: e for k, e in grid.entries.items() if e.method == name})
            if not hits:
                raise GridError(f"--methods {name}: not in grid {grid.name}; its entries: {', '.join(grid.entries)}")
            chosen.update(hits)
        entries = {k: e for k, e in grid.entries.items() if k in chosen}
    if tasks:
        names = [n.strip() for n in tasks.split(",") if n.strip()]
        bad = [n for n in names if n not in grid.tasks]
        if bad:
            raise GridError(f"--tasks {', '.join(bad)}: not in grid {grid.name}; its tasks: {', '.join(grid.tasks)}")
        task_map = {k: v for k, v in grid.tasks.items() if k in names}
    return dataclasses.replace(grid, entries=entries, tasks=task_map)


def unregistered(grid: Grid) -> list[str]:
    """Entries whose method is not in the methods registry (yet)."""
    from guided_diffusion.methods import available_methods

    known = set(available_methods())
    return [k for k, e in grid.entries.items() if e.method not in known]


def yaml_value(value) -> str:
    """A value as the CLI's dotted overrides read it back (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """(task overrides for every cell, {sampler key: override text}) from dotted `key=value` texts."""
    task, sampler = [], {}
    for text in overrides:
        parts, _ = parse_override(text)
        if parts[0] == "sampler":
            if len(parts) != 2:
                raise GridError(f"override {text!r}: sampler settings are one level deep (sampler.KEY=value)")
            sampler[parts[1]] = text
        else:
            task.append(text)
    return task, sampler


def entry_overrides(entries: Iterable[Entry], sampler: Mapping[str, str]) -> dict[str, list[str]]:
    """{entry: its `sampler.KEY=value` overrides}: the entry's settings, then the command line's
    sampler overrides for the keys its method has (the command line wins). A command-line key that
    no chosen method has is an error."""
    from guided_diffusion.methods import available_methods, method_fields

    out, used, known = {}, set(), set(available_methods())
    for e in entries:
        if e.method not in known:  # reported by `unregistered`; such a cell never runs
            out[e.name] = []
            continue
        fields = method_fields([e.method])
        bad = sorted(set(e.settings) - fields)
        if bad:
            raise GridError(f"grid entry {e.name}: method {e.method!r} has no setting(s) {bad}; "
                            f"its settings: {', '.join(sorted(fields))}")
        values = {k: f"sampler.{k}={yaml_value(v)}" for k, v in e.settings.items()}
        for key, text in sampler.items():
            if key in fields:
                values[key] = text
                used.add(key)
        out[e.name] = list(values.values())
    unused = sorted(set(sampler) - used)
    if unused:
        raise GridError(f"override(s) {', '.join(sampler[k] for k in unused)}: no chosen method has that setting")
    return out


@dataclass(frozen=True)
class Cell:
    """One (entry, task) of a grid: where it is written and the command line that writes it."""
    entry: Entry
    task: str                 # the task's name (its output folder)
    task_config: str
    save_dir: Path            # the CLI's --save_dir: DIR/<entry>
    overrides: tuple          # dotted overrides for the CLI (task ones, then the entry's sampler ones)
    expected: int | None      # images the cell should hold (None: the data folder is not here)
    data_root: str = ""       # the task's data.root, as resolved

    @property
    def dir(self) -> Path:
        return self.save_dir / self.entry.method / self.task

    @property
    def label(self) -> str:
        return f"{self.entry.name}/{self.task}"

    def record_path(self, index: int) -> Path:
        return self.dir / "records" / f"{index:05d}.json"  # util.outputs.OutputTree's layout

    def done(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if self.record_path(i).exists()]

    def runner_file(self, rank: int, world: int) -> Path:
        """The runner's own record of this cell for one process: sessions, seconds, peak memory."""
        return self.dir / "runner" / f"rank{rank:03d}-of-{world:03d}.json"

    def argv(self, flags: Iterable[str] = ()) -> list[str]:
        """`sample_condition.py` arguments for this cell (add --shard / --device / ... via `flags`)."""
        return ["--method", self.entry.method, "--task_config", self.task_config, "--save_dir", str(self.save_dir),
                *flags, *self.overrides]


def task_facts(config: str, task_overrides: Iterable[str], max_images: int | None) -> tuple[str, int | None, str]:
    """(the task's name, how many images it restores: min(max_images, images in data.root), or None when
    the data folder is missing, and that folder)."""
    from util.cli import resolve_path
    from util.config import load_task
    from util.images import list_images

    task = load_task(resolve_path(config), list(task_overrides))
    limit = max_images if max_images is not None else task.data.max_images
    root = resolve_path(task.data.root)
    try:
        n = len(list_images(root))
    except FileNotFoundError:
        return task.name, None, str(root)
    return task.name, n if limit is None else min(int(limit), n), str(root)


def build_cells(grid: Grid, save_dir: str | Path, overrides: Iterable[str] = (),
                max_images: int | None = None) -> list[Cell]:
    """The grid's cells, entry-major, with their CLI overrides (grid's, then the command line's)."""
    task_ov, sampler_ov = split_overrides([*grid.overrides, *overrides])
    per_entry = entry_overrides(grid.entries.values(), sampler_ov)
    limit = max_images if max_images is not None else grid.max_images
    facts = {}
    for key, config in grid.tasks.items():
        name, expected, root = task_facts(config, task_ov, limit)
        if name != key:
            raise GridError(f"{grid.path}: tasks.{key} points to {config}, whose name is {name!r}: use the task's "
                            f"name as the key (it is the output folder)")
        facts[key] = expected, root
    return [Cell(entry=e, task=t, task_config=grid.tasks[t], save_dir=Path(save_dir) / e.name,
                 overrides=(*task_ov, *per_entry[e.name]), expected=facts[t][0], data_root=facts[t][1])
            for e in grid.entries.values() for t in grid.tasks]


# ----------------------------------------------------------------------------- ranks

@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes sharing the grid."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "single process"

    def mine(self, n: int) -> list[int]:
        """Images i < n with i mod world == rank (the CLI's --shard rank/world)."""
        return [i for i in range(n) if i % self.world == self.rank]


def ranks_from_env(env: Mapping[str, str] = os.environ) -> Ranks:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; else SLURM's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
    (one `srun` task per GPU); else one process."""
    for keys, launcher in ((("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun"),
                           (("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "srun")):
        if keys[0] in env and keys[1] in env:
            try:
                rank, world, local = int(env[keys[0]]), int(env[keys[1]]), int(env.get(keys[2], 0))
            except ValueError:
                raise GridError(f"{launcher} variables {keys} are not integers: "
                                f"{[env.get(k) for k in keys]}") from None
            if not (world >= 1 and 0 <= rank < world):
                raise GridError(f"{launcher}: rank {rank} of world size {world} is not valid")
            return Ranks(rank, world, local, launcher)
    return Ranks()


def slurm_rendezvous(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for torch.distributed under srun when not set: the node that
    launched the job step, and a port derived from the job id (so two jobs on a node differ)."""
    out = {}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return out


# ----------------------------------------------------------------------------- peak memory

class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated on a GPU; peak RSS (VmHWM, reset through
    /proc/self/clear_refs after freed heap is returned to the system) on the CPU, else the
    process's lifetime peak RSS (ru_maxrss). The RSS includes what the process holds anyway
    (torch itself, about 0.7 GB).

    `kind` says which was measured; `bytes` is set when the block ends.
    """

    def __init__(self, device):
        self.device, self.bytes, self.kind = device, None, None

    def __enter__(self):
        import gc

        import torch

        gc.collect()  # what an earlier cell left behind is not this cell's memory
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
        else:
            _malloc_trim()  # hand freed heap back to the system, so the RSS starts from what is in use
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak RSS of this process (Linux >= 4.0)
                self.kind = "peak_rss"
            except OSError:
                self.kind = "peak_rss_since_process_start"
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

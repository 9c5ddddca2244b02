"""scripts/reproduce.py: grids and their cells, ranks, the tables, and a grid under torchrun killed and resumed."""
import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT
from util import grid_table
from util.grid import (GridError, PeakMemory, Ranks, available_grids, build_cells, load_grid, narrow,
                       ranks_from_env, unregistered)
from util.grid_run import LogStream

SCRIPT = ROOT / "scripts" / "reproduce.py"
CELL_ARGS = ["--grid", "demo", "--methods", "ld_smc,ltds", "--tasks", "inpainting_box", "--max_images", "4"]
# Short runs: one image per batch (so a kill lands between images), 10 steps, short optimisations.
FAST = ["--threads", "1", "--batch_size", "1", "--no_figures", "sampler.num_steps=10", "sampler.xhat_max_iters=20",
        "sampler.refine_max_iters=5"]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = load_script()



def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- grids and cells

def test_shipped_grids_hold_the_issues_cells(tmp_path):
    assert {"demo", "demo-steps", "paper-ffhq", "paper-imagenet"} <= set(available_grids())
    for name in available_grids():
        grid = load_grid(name)
        cells = build_cells(grid, tmp_path)
        assert len({c.dir for c in cells}) == len(cells) == len(grid.entries) * len(grid.tasks), name
        for cell in cells:
            assert cell.dir == tmp_path / cell.entry.name / cell.entry.method / cell.task

    demo = load_grid("demo")
    assert {"inpainting_box", "inpainting_free_form", "inpainting_random", "gaussian_blur",
            "super_resolution_x4"} <= set(demo.tasks)
    ld_smc = {(e.settings["num_particles"], e.settings["preset"]) for e in demo.entries.values()
              if e.method == "ld_smc"}
    assert ld_smc == {(n, p) for n in (1, 4, 16) for p in ("reference", "exact")}
    assert {"ldps", "gml_dps", "psld", "resample", "ltds", "latent_daps"} <= {e.method for e in demo.entries.values()}
    assert all(c.expected == 20 for c in build_cells(demo, tmp_path))  # the twenty demo digits

    steps = load_grid("demo-steps")
    assert set(steps.tasks) == {"inpainting_box", "super_resolution_x4"}
    for method in ("ld_smc", "ldps"):
        assert sorted(e.settings["num_steps"] for e in steps.entries.values() if e.method == method) == [20, 50, 100, 200]

    paper_tasks = {"inpainting_box", "inpainting_free_form", "gaussian_blur", "super_resolution_x8"}
    for name, folder in (("paper-ffhq", "configs/tasks/"), ("paper-imagenet", "configs/tasks/imagenet/")):
        grid = load_grid(name)
        assert set(grid.tasks) == paper_tasks and grid.max_images == 1000
        assert all(path.startswith(folder) and path.count("/") == folder.count("/") for path in grid.tasks.values())
        assert {e.settings.get("num_particles") for e in grid.entries.values() if e.method == "ld_smc"} == {1, 5}


def test_narrowing_by_entry_method_and_task():
    grid = load_grid("demo")
    assert list(narrow(grid, "ld_smc").entries) == ["ld_smc"]  # an entry name: that entry only
    steps = narrow(load_grid("demo-steps"), "ld_smc", "super_resolution_x4")  # a method name: all its entries
    assert len(steps.entries) == 4 and list(steps.tasks) == ["super_resolution_x4"]
    with pytest.raises(GridError, match="--methods nonesuch: not in grid demo; its entries: ld_smc"):
        narrow(grid, "ld_smc,nonesuch")
    with pytest.raises(GridError, match="--tasks deblur: not in grid demo"):
        narrow(grid, tasks="deblur")
    with pytest.raises(GridError, match="no grid 'nonesuch': choose one of .*demo"):
        load_grid("nonesuch")


def test_settings_and_sampler_overrides_reach_the_methods_that_have_them(tmp_path):
    grid = narrow(load_grid("demo"), "ld_smc_n16_exact,ltds", "inpainting_box")
    smc, tds = build_cells(grid, tmp_path, ["sampler.xhat_max_iters=20", "sampler.num_particles=2",
                                            "measurement.noise.sigma=0.05"])
    assert smc.overrides == ("measurement.noise.sigma=0.05", "sampler.num_particles=2", "sampler.preset=exact",
                             "sampler.xhat_max_iters=20")  # the command line wins over the entry's settings
    assert tds.overrides == ("measurement.noise.sigma=0.05", "sampler.xhat_max_iters=20", "sampler.num_particles=2")
    assert smc.argv(["--shard", "0/2"])[:7] == ["--method", "ld_smc", "--task_config",
                                                "configs/tasks/demo/inpainting_config.yaml", "--save_dir",
                                                str(tmp_path / "ld_smc_n16_exact"), "--shard"]
    with pytest.raises(GridError, match="sampler.no_such_key=1: no chosen method has that setting"):
        build_cells(grid, tmp_path, ["sampler.no_such_key=1"])


def write_grid(tmp_path, methods, tasks=None):
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({"published": "mini", "max_images": 2, "methods": methods,
                                    "tasks": tasks or {"inpainting_box": "configs/tasks/demo/inpainting_config.yaml"}}))
    return str(path)


def test_grid_file_errors_name_the_key(tmp_path):
    with pytest.raises(GridError, match="methods.bad.settings must be a mapping"):
        load_grid(write_grid(tmp_path, {"bad": {"method": "ld_smc", "settings": [1]}}))
    with pytest.raises(GridError, match="tasks.box points to .*whose name is 'inpainting_box'"):
        build_cells(load_grid(write_grid(tmp_path, {"ld_smc": {}},
                                         {"box": "configs/tasks/demo/inpainting_config.yaml"})), tmp_path)
    with pytest.raises(GridError, match=r"grid entry ld_smc_x: method 'ld_smc' has no setting\(s\) \['speed'\]"):
        build_cells(load_grid(write_grid(tmp_path, {"ld_smc_x": {"method": "ld_smc", "settings": {"speed": 1}}})),
                    tmp_path)


def test_an_unregistered_method_is_a_clear_error_or_a_table_line(tmp_path, capsys):
    grid = write_grid(tmp_path, {"ld_smc": {}, "nonesuch_n2": {"method": "nonesuch", "settings": {"x": 1}}})
    assert unregistered(load_grid(grid)) == ["nonesuch_n2"]
    rc = reproduce.main(["--grid", grid, "--save_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: grid mini: method(s) not registered: nonesuch (entries nonesuch_n2)" in err
    assert "--skip_unregistered" in err and "Traceback" not in err

    rc = reproduce.main(["--grid", grid, "--methods", "nonesuch_n2", "--save_dir", str(tmp_path / "out"),
                         "--skip_unregistered"])
    assert rc == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "nonesuch_n2/inpainting_box: not registered: method 'nonesuch'" in table


def test_ranks_from_torchrun_slurm_or_none():
    assert ranks_from_env({}) == Ranks(0, 1, 0, "single process")
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1, "torchrun")
    assert ranks_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == Ranks(5, 8, 1, "srun")
    with pytest.raises(GridError, match="rank 4 of world size 4"):
        ranks_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert Ranks(1, 3).mine(8) == [1, 4, 7]


def test_log_stream_keeps_lines_not_progress_redraws(tmp_path):
    with open(tmp_path / "log", "w") as f:
        s = LogStream(f)
        s.write("\rstep 1/3\rstep 2/3\x1b[A\rstep 3/3\n")
        s.write("error: something to fix\npartial")
    assert (tmp_path / "log").read_text() == "step 3/3\nerror: something to fix\n"
    assert s.error() == "something to fix"


def test_peak_memory_on_the_cpu():
    with PeakMemory(torch.device("cpu")) as m:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MB
    assert m.kind in ("peak_rss", "peak_rss_since_process_start") and m.bytes >= x.numel() * 4


# ----------------------------------------------------------------------------- torchrun, kill, resume

def children(pid):
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def snapshot(root):
    """{file: (mtime_ns, bytes)} of every record and reconstruction under a grid folder."""
    files = [*root.glob("*/*/*/records/*.json"), *root.glob("*/*/*/recon*/*.png")]
    return {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


def sessions(cell_dir):
    return [s for f in sorted((cell_dir / "runner").glob("*.json")) for s in json.loads(f.read_text())["sessions"]]


@pytest.fixture(scope="module")
def resumed_grid(tmp_path_factory):
    """The 2-method x 1-task x 4-image demo grid under torchrun (2 processes, Gloo): one rank killed
    (SIGKILL) after the first image is recorded, then the same command again."""
    base = tmp_path_factory.mktemp("grid")
    root = base / "run"
    env = dict(os.environ, TORCH_HOME=str(base / "no-weights"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           *CELL_ARGS, "--save_dir", str(root), *FAST]
    with open(base / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        first_cell = root / "ld_smc" / "ld_smc" / "inpainting_box" / "records"
        deadline = time.time() + 300
        while not list(first_cell.glob("*.json")):
            assert proc.poll() is None and time.time() < deadline, (base / "first.log").read_text()
            time.sleep(0.05)
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun then stops the other
        proc.wait(timeout=120)
    assert proc.returncode != 0
    while any(Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text()
              for w in workers):
        time.sleep(0.1)
    before = snapshot(root)
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return SimpleNamespace(root=root, before=before, rerun=rerun, cmd=cmd, env=env)


def test_a_killed_torchrun_grid_resumes_without_recomputing(resumed_grid):
    g = resumed_grid
    assert g.rerun.returncode == 0, g.rerun.stderr[-3000:]
    done_before = {cell: sum(1 for f in g.before if f.parent.name == "records" and f.parent.parent == g.root / cell)
                   for cell in ("ld_smc/ld_smc/inpainting_box", "ltds/ltds/inpainting_box")}
    assert 1 <= sum(done_before.values()) < 8  # the kill came after some images and before the end
    for path, (mtime, data) in g.before.items():  # finished images were not redone
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    for cell, n_before in done_before.items():
        folder = g.root / cell
        rows = read_csv(folder / "metrics.csv")
        assert [r["index"] for r in rows] == ["0", "1", "2", "3"]  # all there, none twice
        assert json.loads((folder / "summary.json").read_text())["images"] == 4
        # Only the rerun's sessions were recorded (a killed one records nothing) and they computed
        # exactly the images that were missing.
        assert sum(s["images_computed"] for s in sessions(folder)) == 4 - n_before
        assert {s["memory_kind"] for s in sessions(folder)} == {"peak_rss"}

    table = read_csv(g.root / "table.csv")
    assert {(r["entry"], r["output"], r["status"], r["images"]) for r in table} == {
        (e, o, "done", "4") for e in ("ld_smc", "ltds") for o in ("recon", "recon_opt")}
    for row in table:
        assert float(row["psnr_mean"]) > 0 and float(row["seconds_mean"]) > 0
        assert row["lpips_mean"] == "" and "alexnet-owt-7be5be79.pth" in row["lpips_note"]
        assert row["fid"] == "" and "pt_inception-2015-12-05-6726825d.pth" in row["fid_note"]
        assert float(row["peak_memory_mb"]) > 0
    md = (g.root / "table.md").read_text()
    assert "| ld_smc | ld_smc | num_particles=4, preset=reference | recon | 4/4 |" in md
    assert "no weights [" in md and "None: every cell holds all its images." in md

    # The same command once more, as one plain process: nothing is loaded or recomputed.
    now = snapshot(g.root)
    n_sessions = {cell: len(sessions(g.root / cell)) for cell in done_before}
    again = subprocess.run([sys.executable, str(SCRIPT), *CELL_ARGS, "--save_dir", str(g.root), *FAST], cwd=ROOT,
                           env=g.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot(g.root) == now
    assert {cell: len(sessions(g.root / cell)) for cell in done_before} == n_sessions


def test_aggregate_only_names_missing_cells_and_shows_published_numbers(resumed_grid, tmp_path, capsys,
                                                                        monkeypatch):
    root = tmp_path / "run"
    shutil.copytree(resumed_grid.root, root)
    published = tmp_path / "published.yaml"
    published.write_text(yaml.safe_dump({"demo": {"ld_smc": {"inpainting_box": {
        "psnr": {"value": 31.5, "source": "Test et al. 2025, Table 9"},
        "seconds": {"value": 537, "source": "Test et al. 2025, Table 10"}}}}}))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    rc = reproduce.main(["--grid", "demo", "--methods", "ld_smc,ltds,ld_smc_n1", "--tasks", "inpainting_box",
                         "--max_images", "4", "--save_dir", str(root), "--aggregate_only",
                         "--published", str(published)])
    out = capsys.readouterr().out
    assert rc == 1  # a cell is missing
    assert "1 cell(s) missing or incomplete" in out and "ld_smc_n1/inpainting_box: missing" in out
    md = (root / "table.md").read_text()
    assert f"- ld_smc_n1/inpainting_box: missing ({root / 'ld_smc_n1' / 'ld_smc' / 'inpainting_box'})" in md
    assert "run by 2 process(es) (torchrun), then 1 process(es) (single process)" in md
    line = next(x for x in md.splitlines() if x.startswith("| ld_smc | ld_smc |"))
    assert "PSNR 31.5 [" in line and "SECONDS 537 [" in line
    assert "Test et al. 2025, Table 9" in md and "Test et al. 2025, Table 10" in md
    rows = {(r["entry"], r["output"]): r for r in read_csv(root / "table.csv")}
    assert rows[("ld_smc", "recon")]["published_psnr"] == "31.5"
    assert rows[("ld_smc", "recon")]["published_psnr_source"] == "Test et al. 2025, Table 9"
    assert rows[("ltds", "recon")]["published_psnr"] == ""  # nothing published: left empty
    assert rows[("ld_smc_n1", "recon")]["status"] == "missing"


def test_fid_and_lpips_are_computed_once_where_their_weights_are(resumed_grid, tmp_path, monkeypatch):
    """The run had no LPIPS or Inception weights; once they are on disk, the aggregation computes
    FID and (from the saved PNGs) LPIPS once per cell, then reads fid.json / lpips.json."""
    root = tmp_path / "run"
    shutil.copytree(resumed_grid.root, root)
    calls = []

    def evaluate_fid(task_dir, which, device="cpu"):
        calls.append(("fid", Path(task_dir)))
        out = {"reportable": True, **{f"fid_{o}": 12.5 for o in which},
               **{f"n_{o}": len(list((Path(task_dir) / o).glob("*.png"))) for o in which}}
        (Path(task_dir) / "fid.json").write_text(json.dumps(out))
        return out

    def evaluate_lpips(task_dir, which, device="cpu"):
        calls.append(("lpips", Path(task_dir)))
        out = {"reportable": True, **{f"lpips_{o}": {p.name: 0.1 * (k + 1) + (o == "recon_opt") * 0.05
                                                      for k, p in enumerate(sorted((Path(task_dir) / o).glob("*.png")))}
                                      for o in which}}
        (Path(task_dir) / "lpips.json").write_text(json.dumps(out))
        return out

    monkeypatch.setattr("util.metrics.hub_checkpoint", lambda url, what: Path("weights-present"))
    monkeypatch.setattr(grid_table, "_evaluate_module",
                        lambda: SimpleNamespace(evaluate_fid=evaluate_fid, evaluate_lpips=evaluate_lpips))
    grid = narrow(load_grid("demo"), "ld_smc,ltds", "inpainting_box")
    cells = build_cells(grid, root, max_images=4)
    for _ in range(2):
        grid_table.aggregate(cells, root, title="t")
    # once per cell and metric, then read from fid.json / lpips.json
    assert sorted(calls) == sorted((m, c.dir) for c in cells for m in ("fid", "lpips"))
    rows = read_csv(root / "table.csv")
    assert {r["fid"] for r in rows} == {"12.5"} and {r["fid_images"] for r in rows} == {"4"}
    values = {"recon": [0.1, 0.2, 0.3, 0.4], "recon_opt": [0.15, 0.25, 0.35, 0.45]}
    for r in rows:
        v = torch.tensor(values[r["output"]], dtype=torch.float64)
        assert float(r["lpips_mean"]) == pytest.approx(float(v.mean()), rel=1e-5)  # csv: 6 digits
        assert float(r["lpips_std"]) == pytest.approx(float(v.std(unbiased=False)), rel=1e-5)
        assert r["lpips_note"] == grid_table.LPIPS_FROM_PNGS
    md = (root / "table.md").read_text()
    assert "12.50 (n=4)" in md and "0.250 ± 0.112 [" in md and "from its saved 8-bit PNGs" in md


def test_lpips_json_that_misses_an_image_is_not_used(resumed_grid, tmp_path, monkeypatch):
    root = tmp_path / "run"
    shutil.copytree(resumed_grid.root, root)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    cell = root / "ld_smc" / "ld_smc" / "inpainting_box"
    (cell / "lpips.json").write_text(json.dumps({"reportable": True, "lpips_recon": {
        f"{i:05d}.png": 0.2 for i in range(3)}}))  # image 3 is missing
    grid = narrow(load_grid("demo"), "ld_smc", "inpainting_box")
    grid_table.aggregate(build_cells(grid, root, max_images=4), root, title="t")
    row = next(r for r in read_csv(root / "table.csv") if r["output"] == "recon")
    assert row["lpips_mean"] == "" and "alexnet-owt-7be5be79.pth" in row["lpips_note"]
    assert "--aggregate_only computes LPIPS from the saved PNGs" in row["lpips_note"]


def test_srun_variables_make_a_process_group(resumed_grid, tmp_path):
    """Under srun (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, no torchrun variables) the processes
    meet at MASTER_ADDR:MASTER_PORT (defaults: the launching node, a port from the job id)."""
    root = tmp_path / "run"
    shutil.copytree(resumed_grid.root, root)
    env = {k: v for k, v in resumed_grid.env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_NTASKS="2", SLURM_JOB_ID=str(30000 + os.getpid() % 10000), SLURM_LAUNCH_NODE_IPADDR="127.0.0.1")
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *CELL_ARGS, "--save_dir", str(root), *FAST], cwd=ROOT,
                              env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "tables:" in outs[0] and "tables:" not in outs[1]  # rank 0 writes them
    assert "2 process(es) (srun)" in (root / "table.md").read_text()


def test_grid_summary_tables_and_paired_differences(resumed_grid, capsys):
    spec = importlib.util.spec_from_file_location("grid_summary", ROOT / "scripts" / "grid_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    assert summary.main([str(resumed_grid.root), "--against", "ld_smc"]) == 0
    out = capsys.readouterr().out
    table = {(r["entry"], r["output"]): float(r["psnr_mean"]) for r in read_csv(resumed_grid.root / "table.csv")}
    assert (f"| ld_smc | {table[('ld_smc', 'recon')]:.2f} / {table[('ld_smc', 'recon_opt')]:.2f} |"
            in out)
    # The paired difference: per image, ltds minus ld_smc, from the cells' own metrics.csv.
    cell = {e: {r["file"]: r for r in read_csv(resumed_grid.root / e / e / "inpainting_box" / "metrics.csv")}
            for e in ("ld_smc", "ltds")}
    for column, heading in (("psnr_recon", "minus ld_smc's, per image"), ("psnr_recon_opt", "minus ld_smc's final")):
        d = [float(cell["ltds"][f][column]) - float(cell["ld_smc"][f][column]) for f in cell["ld_smc"]]
        mean = sum(d) / len(d)
        se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        section = out[out.index(heading):]
        assert f"| ltds | {mean:+.2f} +- {se:.2f} |" in section.splitlines()[4]
    with pytest.raises(SystemExit, match="not an entry of this grid"):
        summary.main([str(resumed_grid.root), "--against", "nope"])

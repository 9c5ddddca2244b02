"""Resume, --overwrite and the tables of sample_condition.py when the image folder or the run changes."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import guided_diffusion.methods as methods
from conftest import ROOT, cli

DIGITS = sorted((ROOT / "data" / "samples" / "demo").glob("*.png"))
FAST = ["--ddim_steps", "3", "--num_particles", "2", "--seed", "0", "--threads", "1", "--batch_size", "1",
        "--no_figures", "sampler.xhat_max_iters=20", "sampler.refine_max_iters=5"]



@pytest.fixture()
def sampled(monkeypatch):
    """The batch sizes the method was called with; an entry of `interrupt_at` raises KeyboardInterrupt there."""
    class Calls(list):
        interrupt_at = None

    real = methods.Method.__call__
    calls = Calls()

    def call(self, model, operator, y, **kw):
        calls.append(y.shape[0])
        if len(calls) == calls.interrupt_at:
            raise KeyboardInterrupt
        return real(self, model, operator, y, **kw)

    monkeypatch.setattr(methods.Method, "__call__", call)
    return calls



def rows(root):
    with open(root / "metrics.csv") as f:
        return list(csv.DictReader(f))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_file_added_before_the_others_is_refused_not_mispaired(tmp_path, capsys, sampled):
    """Outputs are numbered by position in the sorted list: a.png added before b.png, c.png would shift them."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(DIGITS[0], folder / "b.png")
    shutil.copy(DIGITS[1], folder / "c.png")
    args = ["--save_dir", tmp_path / "out", f"data.root={folder}", *FAST]
    root = tmp_path / "out" / "ld_smc" / "inpainting_box"
    assert cli(capsys, *args)[0] == 0
    before = pixels(root / "input" / "00000.png")

    shutil.copy(DIGITS[2], folder / "a.png")
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "error: " in err and "Traceback" not in err
    assert "00000 was b.png, now a.png" in err and "--overwrite" in err
    assert (pixels(root / "input" / "00000.png") == before).all()  # nothing was paired with the wrong file

    sampled[:] = []
    rc, _, err = cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert [r["file"] for r in rows(root)] == ["a.png", "b.png", "c.png"] and sampled == [1, 1, 1]
    assert (pixels(root / "input" / "00001.png") == before).all()  # b.png is image 1 now

    # A file whose name sorts after the others only adds an image: the run resumes with it alone.
    shutil.copy(DIGITS[3], folder / "d.png")
    sampled[:] = []
    rc, _, err = cli(capsys, *args)
    assert rc == 0 and sampled == [1], err
    assert [r["file"] for r in rows(root)] == ["a.png", "b.png", "c.png", "d.png"]


def test_overwrite_clears_only_the_images_it_redoes(tmp_path, capsys, sampled):
    args = ["--save_dir", tmp_path, *FAST, "--max_images", "3"]
    root = tmp_path / "ld_smc" / "inpainting_box"
    assert cli(capsys, *args)[0] == 0
    stamps = {i: (root / "recon" / f"0000{i}.png").stat().st_mtime_ns for i in (1, 2)}

    sampled[:] = []
    rc, _, err = cli(capsys, *args[:-1], "1", "--overwrite")
    assert rc == 0 and sampled == [1], err
    for i in (1, 2):  # not asked to redo them: kept, untouched
        assert (root / "records" / f"0000{i}.json").is_file()
        assert (root / "recon" / f"0000{i}.png").stat().st_mtime_ns == stamps[i]
    # the tables of the full task come back with the next run that covers it
    assert cli(capsys, *args)[0] == 0 and [r["index"] for r in rows(root)] == ["0", "1", "2"]

    # With other settings, the images left out would keep outputs made with the old ones: refused.
    rc, _, err = cli(capsys, *args[:-1], "1", "--overwrite", "--kappa1", "0.5")
    assert rc == 2 and "kappa1" in err and "1-2" in err and "--max_images" in err, err
    assert (root / "recon" / "00001.png").stat().st_mtime_ns == stamps[1]
    # Without --max_images, --overwrite redoes the whole task with the new settings.
    sampled[:] = []
    rc, _, err = cli(capsys, *args, "--overwrite", "--kappa1", "0.5")
    assert rc == 0 and sampled == [1, 1, 1], err
    assert json.loads((root / "summary.json").read_text())["sampler"]["kappa1"] == 0.5


def test_tables_are_written_as_images_finish(tmp_path, capsys, sampled):
    """An interrupted run leaves metrics.csv and summary.json covering the images finished so far."""
    sampled.interrupt_at = 3
    rc, _, err = cli(capsys, "--save_dir", tmp_path, *FAST, "--max_images", "4")
    assert rc == 130, err
    root = tmp_path / "ld_smc" / "inpainting_box"
    assert [r["index"] for r in rows(root)] == ["0", "1"]
    assert json.loads((root / "summary.json").read_text())["images"] == 2


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_a_killed_run_are_removed(tmp_path, capsys, sampled):
    """A SIGKILL mid-write leaves `.NAME.<host>-<pid>.<uuid>.tmp`; the next run removes those of dead
    processes (and the old `.NAME.<pid>.<uuid>.tmp` form), never a live process's."""
    from util.files import temp_path

    args = ["--save_dir", tmp_path, *FAST, "--max_images", "1"]
    root = tmp_path / "ld_smc" / "inpainting_box"
    assert cli(capsys, *args)[0] == 0
    dead = _dead_pid()
    ours = temp_path(root / "recon" / "00000.png")
    killed = ours.with_name(ours.name.replace(f"-{os.getpid()}.", f"-{dead}."))
    old_form = root / "recon" / f".00001.png.{dead}.0123456789abcdef.tmp"
    for p in (ours, killed, old_form):
        p.write_bytes(b"half a png")
    assert cli(capsys, *args)[0] == 0
    assert not killed.exists() and not old_form.exists()
    assert ours.exists()  # this process is alive: its write may be in progress
    ours.unlink()

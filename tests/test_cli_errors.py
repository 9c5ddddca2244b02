"""Every mistake a user can make ends sample_condition.py with exit 2 and one `error: ...` line naming what to fix."""
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import guided_diffusion.methods as methods
import sample_condition
import smc
from conftest import COMPACT, ROOT

DIGITS = sorted((ROOT / "data" / "samples" / "demo").glob("*.png"))
FAST = ["--ddim_steps", "3", "--num_particles", "2", "--max_images", "1", "--seed", "0", "--threads", "1",
        "--no_figures", "sampler.xhat_max_iters=20", "sampler.refine_max_iters=5"]



def error_line(capsys, *args):
    rc = sample_condition.main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert rc == 2, (rc, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err[-3000:]
    return last


def png_header_only(path, width, height):
    """A PNG whose header claims width x height (1 byte of pixel data): Pillow reads the size first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def folder_with(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for i, (fname, maker) in enumerate(files.items()):
        if maker is None:
            shutil.copy(DIGITS[i], folder / fname)
        else:
            maker(folder / fname)
    return folder


def test_config_values_of_the_wrong_type_or_range(tmp_path, capsys):
    base = ["--save_dir", tmp_path / "out", *FAST]
    cases = {"measurement.noise.sigma=abc": "measurement.noise.sigma", "measurement.noise.sigma=0":
             "measurement.noise.sigma", "data.root=5": "data.root", "data.batch_size=0": "data.batch_size",
             "data.batch_size=abc": "data.batch_size", "data.image_size=abc": "data.image_size",
             "data.max_images=0": "data.max_images", "sampler.kappa1=abc": "sampler.kappa1",
             "sampler.num_gibbs_iters=1.5": "sampler.num_gibbs_iters", "sampler.kappa2=.inf": "sampler.kappa2"}
    for override, key in cases.items():
        assert key in error_line(capsys, *base, override), override
    assert "clean" in error_line(capsys, *base, "measurement.noise.sigma=0")  # says what to use instead
    task = tmp_path / "task.yaml"
    task.write_text((ROOT / "configs/tasks/demo/gaussian_deblur_config.yaml").read_text().replace(
        "sigma: 0.01", "sigma: abc"))
    err = error_line(capsys, *base, "--task_config", task)
    assert "measurement.noise.sigma" in err and "task.yaml" in err
    assert not (tmp_path / "out").exists()


def test_flags_out_of_range(tmp_path, capsys):
    base = ["--save_dir", tmp_path / "out", *FAST]
    assert "--seed" in error_line(capsys, *base, "--seed", "-1")
    assert "--threads" in error_line(capsys, *base, "--threads", "-1")
    assert "--threads" in error_line(capsys, *base, "--threads", "0")
    assert "--s " in error_line(capsys, *base, "--s", "5000")
    assert "--kappa1" in error_line(capsys, *base, "--kappa1", "inf")
    assert "--rho" in error_line(capsys, *base, "--rho", "nan")
    if not torch.backends.mps.is_available():
        assert "mps" in error_line(capsys, *base, "--device", "mps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, words", [({"RANK": "1"}, ["RANK", "WORLD_SIZE"]),
                                        ({"WORLD_SIZE": "2"}, ["RANK", "WORLD_SIZE"]),
                                        ({"RANK": "3", "WORLD_SIZE": "2"}, ["RANK=3", "WORLD_SIZE=2"]),
                                        ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE"]),
                                        ({"RANK": "a", "WORLD_SIZE": "2"}, ["RANK"])])
def test_torchrun_variables_are_checked_as_shard_is(tmp_path, capsys, monkeypatch, env, words):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    err = error_line(capsys, "--save_dir", tmp_path, *FAST)
    assert all(w in err for w in words), err


def test_bad_checkpoint_files_are_named(tmp_path, capsys):
    base = ["--save_dir", tmp_path / "out", *FAST]
    demo = (ROOT / "models/demo/demo_ldm.safetensors").read_bytes()
    lightning = (COMPACT / "compact_ldm_lightning.ckpt").read_bytes()
    files = {"cut.safetensors": demo[:len(demo) // 2], "junk.safetensors": b"garbage" * 9,
             "cut.ckpt": lightning[:len(lightning) // 2], "junk.ckpt": b"garbage" * 9, "empty.ckpt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        err = error_line(capsys, *base, "--diffusion_config", tmp_path / name)
        assert name in err and "download it again" in err, err


def test_output_folder_problems(tmp_path, capsys):
    base = ["--save_dir", tmp_path / "out", *FAST]
    (tmp_path / "out" / "ld_smc").mkdir(parents=True)
    (tmp_path / "out" / "ld_smc" / "inpainting_box").write_text("a file where the task folder goes")
    err = error_line(capsys, *base)
    assert "inpainting_box is a file" in err and "--save_dir" in err
    # A folder that takes no files: read-only for a normal user; as root (which may write anywhere) /sys.
    if os.geteuid() == 0:
        readonly = "/sys/ld_smc_outputs"
        try:
            os.mkdir(readonly)
        except OSError:
            pass  # as expected: sysfs takes no new folders
        else:
            os.rmdir(readonly)
            pytest.skip("running as root with a writable /sys: no read-only folder to test with")
    else:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
    err = error_line(capsys, "--save_dir", readonly, *FAST)
    assert "cannot write the outputs" in err and "--save_dir" in err


def test_image_folder_problems_are_all_reported_at_once(tmp_path, capsys):
    base = ["--save_dir", tmp_path / "out", *FAST]
    bad = folder_with(tmp_path, "bad", {
        "a.png": None, "b.png": lambda p: p.write_bytes(b"not a png"),
        "c.png": lambda p: p.write_bytes(DIGITS[0].read_bytes()[:60]),  # truncated
        "d.png": lambda p: png_header_only(p, 14000, 14000),  # a decompression bomb by Pillow's rule
        "._e.png": lambda p: p.write_bytes(b"macOS resource fork")})
    err = error_line(capsys, *base, f"data.root={bad}", "--max_images", "10")
    assert "3 image file(s)" in err and all(n in err for n in ("b.png", "c.png", "d.png")), err
    assert "._e.png" not in err and "a.png" not in err
    assert not any((tmp_path / "out").rglob("*.png"))
    # hidden files alone are no problem
    fine = folder_with(tmp_path, "fine", {"a.png": None, "._a.png": lambda p: p.write_bytes(b"fork")})
    assert sample_condition.main([str(a) for a in ["--save_dir", tmp_path / "out2", *FAST, f"data.root={fine}"]]) == 0
    capsys.readouterr()
    # data.root naming: a file, a missing folder, and a task without a data: section
    err = error_line(capsys, *base, f"data.root={DIGITS[0]}")
    assert "data.root" in err and "is a file" in err
    task = tmp_path / "nodata.yaml"
    task.write_text("measurement:\n  operator: {name: gaussian_blur, kernel_size: 9, intensity: 1.0}\n"
                    "  noise: {name: gaussian, sigma: 0.01}\nmodel: {config: configs/models/demo.yaml}\n")
    err = error_line(capsys, *base, "--task_config", task)
    assert "data.root" in err and "does not exist" in err


def test_missing_measurement_section_gives_a_working_example(tmp_path, capsys):
    task = tmp_path / "task.yaml"
    task.write_text("data: {root: data/samples/demo}\n")
    err = error_line(capsys, "--save_dir", tmp_path / "out", "--task_config", task)
    assert "'measurement'" in err and "operator: {name:" in err and "noise: {name: gaussian" in err


@dataclass
class _Cfg:
    num_steps: int = 3


class _NonFinite(RuntimeError):
    """Stands for smc.NonFiniteWeightsError where the sampler does not define it yet."""


def test_non_finite_weights_name_the_image_file_and_keep_finished_images(tmp_path, capsys, monkeypatch):
    """The sampler's NonFiniteWeightsError (row `.image` of the batch) becomes an error naming that file."""
    cls = getattr(smc, "NonFiniteWeightsError", None)
    if cls is None:  # before the sampler defines it: the CLI looks it up by name
        monkeypatch.setattr(smc, "NonFiniteWeightsError", _NonFinite, raising=False)
        cls = _NonFinite

    def sample(model, operator, y, cfg, generator=None, cond=None, callback=None):
        if y.shape[0] == 2:  # the second batch: its row 1 goes wrong
            err = cls.__new__(cls)
            RuntimeError.__init__(err, "non-finite log-weights")
            err.image, err.step, err.t = 1, 7, 500
            raise err
        z = torch.stack([torch.randn(tuple(model.latent_shape), generator=g) for g in generator])
        return SimpleNamespace(x0=model.decode(z).clamp(-1, 1), x0_refined=None)

    methods.available_methods()
    monkeypatch.setitem(methods.METHODS, "fake", methods.MethodSpec(
        name="fake", sample=sample, config_cls=_Cfg, needs=("decode",), linear_only=False, paper="-", code="-",
        callbacks=lambda cfg, t: 0))
    # first image 0 alone, then images 1-2 in one batch: its row 1, image 2, goes wrong
    root = tmp_path / "fake" / "inpainting_box"
    assert sample_condition.main([str(a) for a in ["--method", "fake", "--save_dir", tmp_path, "--max_images", "1",
                                                   "--threads", "1", "--no_figures"]]) == 0
    capsys.readouterr()
    err = error_line(capsys, "--method", "fake", "--save_dir", tmp_path, "--max_images", "3", "--batch_size", "2",
                     "--threads", "1", "--no_figures")
    names = sorted(p.name for p in DIGITS)
    assert names[2] in err and "(index 2)" in err and "transition 7" in err and "--kappa1" in err, err
    assert sorted(p.name for p in (root / "records").iterdir()) == ["00000.json"]  # finished image kept
    assert (root / "metrics.csv").read_text().count("\n") == 2  # header + image 0


@pytest.mark.parametrize("load, cores, expected", [(0.0, 2, 2), (0.4, 2, 2), (1.0, 2, 1), (1.6, 2, 1),
                                                   (5.0, 2, 1), (1.0, 16, 8), (3.0, 16, 8), (10.0, 16, 6)])
def test_cpu_threads_leave_out_the_busy_cores(load, cores, expected):
    """Without --threads a CPU run uses torch's default (8 here) less the cores other processes keep busy."""
    from util.cli import cpu_threads

    assert cpu_threads(8 if cores == 16 else 2, load=load, cores=cores) == expected


def test_busy_cores_are_the_machine_s_busy_time_less_this_process_s():
    from util.cli import busy_cores

    # 2 s apart: the machine was busy 3.0 CPU-seconds, of which this process 1.0: one other core busy.
    assert busy_cores(start=(10.0, 100.0, 5.0), end=(12.0, 103.0, 6.0)) == pytest.approx(1.0)
    assert busy_cores(start=(10.0, 100.0, 5.0), end=(12.0, 100.5, 5.5)) == 0.0  # only this process
    assert busy_cores(start=(10.0, 100.0, 5.0), end=(10.0, 100.0, 5.0)) is None  # no window


def test_busy_cores_see_another_process_spinning():
    """Measured, not the load average: a process that started a moment ago counts."""
    import subprocess
    import sys

    from util.cli import busy_cores, cpu_snapshot

    if cpu_snapshot() is None:
        pytest.skip("no /proc/stat on this system (the load average is used there)")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        start = cpu_snapshot()
        time.sleep(0.5)
        assert busy_cores(start=start, end=cpu_snapshot()) >= 0.7
    finally:
        spinner.kill()


def test_an_unreadable_lpips_weights_file_is_named_before_sampling(tmp_path, capsys, monkeypatch):
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    bad = hub / "checkpoints" / "alexnet-owt-7be5be79.pth"
    bad.write_bytes(b"garbage" * 10)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    line = error_line(capsys, "--save_dir", tmp_path / "out", *FAST)
    assert str(bad) in line and "download it again from https://download.pytorch.org/models/" in line
    assert not list((tmp_path / "out").rglob("recon/*.png"))

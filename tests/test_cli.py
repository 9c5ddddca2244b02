"""sample_condition.py end to end on the bundled demo model: every operator family, outputs, resume, errors."""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ldm
from conftest import COMPACT, ROOT, SAMPLE_IMAGES, cli

DEMO = "configs/tasks/demo"
# A very short run: 3 timesteps, 2 particles, one image, short pseudo-inverse and refinement.
# One torch thread: several times faster than two on a shared 2-core machine.
FAST = ["--ddim_steps", "3", "--num_particles", "2", "--max_images", "1", "--seed", "0", "--threads", "1",
        "sampler.xhat_max_iters=20", "sampler.refine_max_iters=5"]




def spy_on_sampler(monkeypatch, before=None):
    """Wrap every method call; `before(y, kwargs)` runs first. Returns the batch sizes sampled, in order."""
    import guided_diffusion.methods as methods

    real = methods.Method.__call__
    calls = []

    def call(self, model, operator, y, **kw):
        calls.append(y.shape[0])
        if before is not None:
            before(y, kw)
        return real(self, model, operator, y, **kw)

    monkeypatch.setattr(methods.Method, "__call__", call)
    return calls


def png(path):
    return np.asarray(Image.open(path))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("task, image_shaped_measurement, baseline", [
    ("inpainting_config", True, "measurement"), ("gaussian_deblur_config", True, "measurement"),
    ("motion_deblur_config", True, "measurement"), ("super_resolution_x4_config", False, "bicubic"),
    ("phase_retrieval_config", False, None)])
def test_each_operator_family(task, image_shaped_measurement, baseline, tmp_path, capsys):
    rc, out, err = cli(capsys, "--task_config", f"{DEMO}/{task}.yaml", "--save_dir", tmp_path, *FAST)
    assert rc == 0, err
    (root,) = [p for p in (tmp_path / "ld_smc").iterdir() if p.is_dir()]
    for kind in ("input", "label", "recon", "recon_opt", "figures"):
        assert (root / kind / "00000.png").is_file(), kind
    assert png(root / "recon" / "00000.png").shape == (32, 32, 3)
    assert png(root / "input" / "00000.png").shape == (32, 32, 3)
    assert (root / "mask" / "00000.png").is_file() == task.startswith("inpainting")

    rows = read_csv(root / "metrics.csv")
    assert len(rows) == 1 and rows[0]["index"] == "0" and rows[0]["file"] == "00000.png"
    for key in ("psnr_recon", "ssim_recon", "psnr_recon_opt", "ssim_recon_opt", "seconds"):
        assert np.isfinite(float(rows[0][key])), key
    # The measurement is compared with the ground truth only where it is an image of the same size.
    assert (rows[0]["psnr_measurement"] != "") == image_shaped_measurement
    assert rows[0]["lpips_recon"] == ""  # no LPIPS backbone on this machine: left empty, never made up

    summary = json.loads((root / "summary.json").read_text())
    assert summary["images"] == 1 and summary["preset"] == "reference"
    assert summary["sampler"]["num_particles"] == 2 and summary["sampler"]["num_steps"] == 3
    assert summary["version"] == ldm.__version__ and summary["device"] == "cpu"
    assert "git_commit" in summary and summary["lpips"].startswith("unavailable")
    assert summary["config"]["task"]["measurement"]["noise"]["sigma"] == 0.01
    comp = summary["comparison"]
    assert comp["psnr_recon"] == pytest.approx(float(rows[0]["psnr_recon"]), abs=1e-4)
    assert "mean PSNR over 1 images" in out
    # Each task's simple reference: the measurement itself, bicubic upsampling of y, or none with the reason.
    assert comp["baseline"] == baseline and (rows[0]["psnr_baseline"] != "") == (baseline is not None)
    if baseline is None:
        assert comp["psnr_gain_db"] is None and "no baseline for phase retrieval" in out
    else:
        assert comp["psnr_baseline"] == pytest.approx(float(rows[0]["psnr_baseline"]), abs=1e-4)
        assert comp["psnr_gain_db"] == pytest.approx(comp["psnr_recon"] - comp["psnr_baseline"])
        label = {"measurement": "measurement", "bicubic": "bicubic upsampling of y"}[baseline]
        assert f"{label} {comp['psnr_baseline']:.2f} dB ({comp['psnr_gain_db']:+.2f} dB)" in out
    if baseline == "measurement":
        assert rows[0]["psnr_baseline"] == rows[0]["psnr_measurement"]


def test_resume_after_an_interruption(tmp_path, capsys, monkeypatch):
    """An interrupted run keeps finished images; the rerun samples only the rest."""
    def interrupt(y, kw):
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt

    calls = spy_on_sampler(monkeypatch, interrupt)
    args = ["--task_config", f"{DEMO}/inpainting_config.yaml", "--save_dir", tmp_path, *FAST,
            "--max_images", "3", "--batch_size", "1", "--no_figures"]
    fail_at = 3
    rc, _, err = cli(capsys, *args)
    assert rc == 130 and "resume" in err
    root = tmp_path / "ld_smc" / "inpainting_box"
    assert sorted(p.name for p in (root / "records").iterdir()) == ["00000.json", "00001.json"]
    first = root / "recon" / "00000.png"
    stamp, pixels = first.stat().st_mtime_ns, png(first)

    fail_at, calls[:] = None, []
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    assert calls == [1]  # only image 2 was sampled again
    assert first.stat().st_mtime_ns == stamp and (png(first) == pixels).all()
    assert [r["index"] for r in read_csv(root / "metrics.csv")] == ["0", "1", "2"]

    calls[:] = []
    rc, _, err = cli(capsys, *args[:-1], "--overwrite", "--no_figures")
    assert rc == 0 and calls == [1, 1, 1]
    assert (png(first) == pixels).all()  # same seed, same image

    # A rerun with other settings would mix two experiments: refused, naming what differs.
    rc, _, err = cli(capsys, *args, "--kappa1", "0.5")
    assert rc == 2 and "kappa1" in err and "--overwrite" in err


def test_shards_share_one_task_folder(tmp_path, capsys, monkeypatch):
    """--shard K/N (or torchrun's RANK/WORLD_SIZE) restores images i = K mod N into the same folder; the
    tables cover every finished image; --overwrite in a shard redoes only that shard's images."""
    sampled = spy_on_sampler(monkeypatch)
    args = ["--task_config", f"{DEMO}/inpainting_config.yaml", "--save_dir", tmp_path, *FAST,
            "--max_images", "3", "--batch_size", "1", "--no_figures"]
    root = tmp_path / "ld_smc" / "inpainting_box"
    rc, _, err = cli(capsys, *args, "--shard", "1/2")
    assert rc == 0, err
    assert sorted(p.name for p in (root / "records").iterdir()) == ["00001.json"]
    assert [r["index"] for r in read_csv(root / "metrics.csv")] == ["1"]
    stamp = (root / "recon" / "00001.png").stat().st_mtime_ns

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sampled[:] = []
    rc, _, err = cli(capsys, *args)
    assert rc == 0 and sampled == [1, 1], err  # images 0 and 2
    assert [r["index"] for r in read_csv(root / "metrics.csv")] == ["0", "1", "2"]
    assert json.loads((root / "summary.json").read_text())["images"] == 3
    assert (root / "recon" / "00001.png").stat().st_mtime_ns == stamp  # the other shard's image is untouched

    sampled[:] = []
    rc, _, err = cli(capsys, *args, "--overwrite")
    assert rc == 0 and sampled == [1, 1], err
    assert (root / "recon" / "00001.png").stat().st_mtime_ns == stamp
    assert [r["index"] for r in read_csv(root / "metrics.csv")] == ["0", "1", "2"]


def test_results_do_not_depend_on_the_batch(tmp_path, capsys):
    common = ["--task_config", f"{DEMO}/inpainting_random_config.yaml", *FAST, "--max_images", "2",
              "--no_figures"]
    assert cli(capsys, *common, "--batch_size", "1", "--save_dir", tmp_path / "one")[0] == 0
    assert cli(capsys, *common, "--batch_size", "2", "--save_dir", tmp_path / "two")[0] == 0
    for i in ("00000", "00001"):
        for kind in ("mask", "label", "recon", "recon_opt"):
            a = png(tmp_path / "one" / "ld_smc" / "inpainting_random" / kind / f"{i}.png")
            b = png(tmp_path / "two" / "ld_smc" / "inpainting_random" / kind / f"{i}.png")
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, (kind, i)
    m0 = png(tmp_path / "one" / "ld_smc" / "inpainting_random" / "mask" / "00000.png")
    m1 = png(tmp_path / "one" / "ld_smc" / "inpainting_random" / "mask" / "00001.png")
    assert (m0 != m1).any()  # each image its own mask


def test_demo_restores_digits(tmp_path, capsys):
    """The demo task's own settings (few particles, short schedule): reconstructions beat the masked input."""
    rc, out, err = cli(capsys, "--save_dir", tmp_path, "--max_images", "4", "--no_figures", "--threads", "1")
    assert rc == 0, err
    summary = json.loads((tmp_path / "ld_smc" / "inpainting_box" / "summary.json").read_text())
    comp = summary["comparison"]
    # Measured with the demo's 25 steps: +3.70 dB (recon) and +5.09 dB (refined) on these four digits.
    assert comp["n"] == 4 and comp["psnr_recon"] > comp["psnr_measurement"] + 2.0, comp
    assert comp["psnr_recon_opt"] > comp["psnr_measurement"] + 3.0, comp
    assert f"{comp['psnr_recon']:.2f} dB" in out


def _error(capsys, *args):
    rc, out, err = cli(capsys, *args)
    assert rc == 2, (rc, err)
    last = err.strip().splitlines()[-1]  # progress and log lines may come before it
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


def test_errors_a_user_can_act_on(tmp_path, capsys):
    base = ["--save_dir", tmp_path / "out", *FAST]
    err = _error(capsys, *base, "--diffusion_config", "models/ldm/ffhq/not_here.ckpt")
    assert "not_here.ckpt" in err and "download_models.sh" in err
    err = _error(capsys, *base, "--task_config", "configs/tasks/nope.yaml")
    assert "nope.yaml" in err and "does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("measurement:\n  operator: {name: gaussian_blur, kernel_size: 5, intensity: 1.0}\n")
    assert "measurement.noise" in _error(capsys, *base, "--task_config", bad)
    assert "data.rooot" in _error(capsys, *base, "data.rooot=somewhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in _error(capsys, *base, f"data.root={empty}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "digit.png").write_bytes(b"not a png at all")
    assert "digit.png" in _error(capsys, *base, f"data.root={broken}")
    err = _error(capsys, *base, "--task_config", "configs/tasks/inpainting_config.yaml",
                 "--ldm_config", "configs/models/demo.yaml")
    assert "256" in err and "32x32" in err
    assert "--batch_size" in _error(capsys, *base, "--batch_size", "0")
    assert "num_particles" in _error(capsys, *base, "--num_particles", "0")
    assert "--ddim_eta 0.5 is not supported" in _error(capsys, *base, "--ddim_eta", "0.5")
    assert "expected K/N" in _error(capsys, *base, "--shard", "half")
    assert "0 <= K < N" in _error(capsys, *base, "--shard", "2/2")
    assert "--ddim_scale 3.0 is not supported" in _error(capsys, *base, "--ddim_scale", "3.0")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


AUTHORS_FLAGS = ["--ldm_config", "configs/latent-diffusion/ffhq-ldm-vq-4.yaml",
                 "--diffusion_config", "models/ldm/ffhq/model.ckpt", "--model_config", "configs/model_config.yaml",
                 "--ddim_eta", "1.0", "--ddim_scale", "1.0", "--save_dir", "./results"]


@pytest.mark.parametrize("config_dir, flags", [("configs/models", []), ("configs/latent-diffusion", AUTHORS_FLAGS)],
                         ids=["our-default-config", "authors-paths-and-flags"])
def test_authors_command_line_with_a_compvis_checkpoint(tmp_path, config_dir, flags):
    """Their layout, run from its own folder: a Lightning checkpoint at models/ldm/ffhq/model.ckpt, the
    FFHQ model config at our default path or at theirs (here a small model of the same family), their
    task YAML; with our defaults, or with every flag of their script spelled out."""
    io = torch.load(COMPACT / "compact_ldm_io.pt", weights_only=True)
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 16, "channels": 3,
        "scale_factor": 1.0, "ckpt_path": "models/ldm/ffhq/model.ckpt",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": dict(io["unet_config"])},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": int(io["embed_dim"]), "n_embed": int(io["n_embed"]), "ddconfig": dict(io["ddconfig"]),
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": "__is_unconditional__"}}}
    (tmp_path / config_dir).mkdir(parents=True)
    (tmp_path / config_dir / "ffhq-ldm-vq-4.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "models" / "ldm" / "ffhq").mkdir(parents=True)
    shutil.copy(COMPACT / "compact_ldm_lightning.ckpt", tmp_path / "models" / "ldm" / "ffhq" / "model.ckpt")
    (tmp_path / "configs" / "tasks").mkdir()
    (tmp_path / "configs" / "tasks" / "inpainting_config.yaml").write_text(
        "conditioning:\n  main_sampler: LD-SMC\n\ndata:\n  name: ffhq\n  root: ./data/samples/\n\n"
        "measurement:\n  operator:\n    name: inpainting\n  mask_opt:\n    mask_type: box\n"
        "    mask_len_range: !!python/tuple [ 32, 33 ]  # for box\n    image_size: 64\n\n\n"
        "  noise:\n    name: gaussian\n    sigma: 0.01\n")
    (tmp_path / "data" / "samples").mkdir(parents=True)
    shutil.copy(sorted(SAMPLE_IMAGES.glob("*.png"))[0], tmp_path / "data" / "samples" / "000_true.png")

    cmd = [sys.executable, str(ROOT / "sample_condition.py"), "--task_config", "configs/tasks/inpainting_config.yaml",
           "--num_particles", "2", "--ddim_steps", "3", "--kappa1", "1.0", "--kappa2", "2.5", "--rho", "0.75",
           "--s", "333", "--num_gibbs_iters", "1", "--gpu", "0", "--seed", "42",
           "--threads", "1", "sampler.xhat_max_iters=20", "sampler.refine_max_iters=5", *flags]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "results" / "ld_smc" / "inpainting_box"
    assert png(out / "recon" / "00000.png").shape == (64, 64, 3)
    assert png(out / "mask" / "00000.png").shape == (64, 64)
    summary = json.loads((out / "summary.json").read_text())
    # The checkpoint comes from the model config's ckpt_path, read from the current folder.
    assert summary["config"]["checkpoint"] == str((tmp_path / "models/ldm/ffhq/model.ckpt").resolve())
    assert summary["config"]["model_config"] == str((tmp_path / config_dir / "ffhq-ldm-vq-4.yaml").resolve())


def test_class_conditional_model_needs_and_gets_labels(tmp_path, capsys, monkeypatch):
    """ImageNet-style tasks: one label per image from data.labels_file (or data.class_label) reaches the sampler."""
    cin = torch.load(COMPACT / "compact_cin_io.pt", weights_only=True)
    vq = torch.load(COMPACT / "compact_ldm_io.pt", weights_only=True)
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 16, "channels": 3,
        "scale_factor": 1.0, "ckpt_path": str(COMPACT / "compact_cin.ckpt"), "conditioning_key": "crossattn",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": dict(cin["unet_config"])},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
            "embed_dim": int(vq["embed_dim"]), "n_embed": int(vq["n_embed"]), "ddconfig": dict(vq["ddconfig"]),
            "ckpt_path": str(COMPACT / "compact_ldm.ckpt")}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": int(cin["n_classes"]), "embed_dim": int(cin["unet_config"]["context_dim"]),
                                         "key": "class_label"}}}}}
    (tmp_path / "cin.yaml").write_text(yaml.safe_dump(config))
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(sorted(SAMPLE_IMAGES.glob("*.png"))[0], images / name)
    task = tmp_path / "task.yaml"
    task.write_text("data: {name: imagenet, root: images}\nmeasurement:\n  operator: {name: inpainting}\n"
                    "  mask_opt: {mask_type: box, mask_len_range: [32, 33], image_size: 64}\n"
                    "  noise: {name: gaussian, sigma: 0.01}\n")
    monkeypatch.chdir(tmp_path)
    args = ["--task_config", task, "--ldm_config", tmp_path / "cin.yaml", "--save_dir", tmp_path / "out",
            *FAST, "--max_images", "2", "--batch_size", "2", "--no_figures"]
    assert "class-conditional" in _error(capsys, *args)
    (images / "labels.txt").write_text("a.png 7\n")
    assert "b.png" in _error(capsys, *args, "data.labels_file=images/labels.txt")
    (images / "labels.txt").write_text("a.png 7\nb.png,3\n")

    seen = []
    spy_on_sampler(monkeypatch, lambda y, kw: seen.append(kw["cond"]))
    rc, _, err = cli(capsys, *args, "data.labels_file=images/labels.txt")
    assert rc == 0, err
    assert seen[0].tolist() == [7, 3]
    assert [r["class_label"] for r in read_csv(tmp_path / "out" / "ld_smc" / "inpainting_box" / "metrics.csv")] == ["7", "3"]


def test_lpips_is_recorded_when_its_weights_are_there(tmp_path, capsys, monkeypatch):
    """With a (stand-in) LPIPS available, every image gets LPIPS values and the summary says which LPIPS."""
    import util.metrics

    class StandIn(torch.nn.Module):
        def __init__(self, net="alex", device="cpu", **kw):
            super().__init__()

        def forward(self, x, y):  # a distance: 0 for equal images, grows with the difference
            return (x - y).abs().flatten(1).mean(1)

    monkeypatch.setattr(util.metrics, "LPIPS", StandIn)
    rc, _, err = cli(capsys, "--task_config", f"{DEMO}/inpainting_config.yaml", "--save_dir", tmp_path, *FAST,
                     "--no_figures")
    assert rc == 0, err
    row = read_csv(tmp_path / "ld_smc" / "inpainting_box" / "metrics.csv")[0]
    for key in ("lpips_recon", "lpips_recon_opt", "lpips_measurement"):
        assert float(row[key]) > 0, key
    summary = json.loads((tmp_path / "ld_smc" / "inpainting_box" / "summary.json").read_text())
    assert summary["lpips"] == "LPIPS(alex)" and summary["metrics"]["lpips_recon"]["n"] == 1

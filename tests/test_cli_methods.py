"""sample_condition.py with --method: the registry's samplers, their settings' precedence, folders, errors."""
import csv
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import guided_diffusion.methods as methods
from conftest import cli

DEMO = "configs/tasks/demo"
FAST = ["--ddim_steps", "3", "--num_particles", "2", "--max_images", "1", "--seed", "0", "--threads", "1",
        "sampler.xhat_max_iters=20", "sampler.refine_max_iters=5", "--no_figures"]




def error_line(capsys, *args):
    rc, _, err = cli(capsys, *args)
    assert rc == 2, (rc, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


@dataclass
class FakeConfig:
    """A method with two settings only: no particles, no kappas."""
    num_steps: int = 3
    sigma_y: float = 0.01


def fake_sample(model, operator, y, cfg, generator=None, cond=None, callback=None):
    """A sampler without ESS or selected particle: decode one latent drawn from each image's generator."""
    z = torch.stack([torch.randn(tuple(model.latent_shape), generator=g) for g in generator])
    for _ in range(cfg.num_steps - 1):
        callback(None)
    with torch.no_grad():
        return SimpleNamespace(x0=model.decode(z).clamp(-1, 1), x0_refined=None)


@pytest.fixture()
def fake_methods(monkeypatch):
    """Registers `fake` (any operator) and `fake_linear` (linear operators only) for one test."""
    methods.available_methods()  # load the real ones first
    for name, linear_only in (("fake", False), ("fake_linear", True)):
        monkeypatch.setitem(methods.METHODS, name, methods.MethodSpec(
            name=name, sample=fake_sample, config_cls=FakeConfig, needs=("decode",), linear_only=linear_only,
            paper="-", code="-", callbacks=lambda cfg, t: cfg.num_steps - 1))


def test_ltds_on_the_demo_end_to_end(tmp_path, capsys):
    rc, out, err = cli(capsys, "--method", "ltds", "--save_dir", tmp_path, *FAST, "--max_images", "2")
    assert rc == 0, err
    root = tmp_path / "ltds" / "inpainting_box"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ltds"]  # never the bare task folder
    assert (root / "recon" / "00001.png").is_file() and (root / "recon_opt" / "00001.png").is_file()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"] == "ltds" and summary["config"]["method"] == "ltds"
    assert summary["sampler"]["aux_observations"] is False and summary["sampler"]["num_particles"] == 2
    assert summary["sampler"]["num_steps"] == 3 and summary["sampler"]["sigma_y"] == 0.01
    run = json.loads((root / "run.json").read_text())
    assert run["method"] == "ltds" and run["sampler"] == summary["sampler"]
    assert summary["images"] == 2 and "mean PSNR over 2 images" in out
    # the demo's sampler section holds N = 4: the flag wins
    with open(root / "metrics.csv") as f:
        assert [r["file"] for r in csv.DictReader(f)] == ["00000.png", "00001.png"]

    # Resume refuses a changed method setting, naming it.
    err = error_line(capsys, "--method", "ltds", "--save_dir", tmp_path, *FAST, "--max_images", "2", "--kappa1", "0.5")
    assert "kappa1" in err and "--overwrite" in err
    # ld_smc on the same task writes its own folder next to it.
    rc, _, err = cli(capsys, "--save_dir", tmp_path, *FAST)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ld_smc", "ltds"]


def test_method_from_the_task_yaml_and_the_flag_wins(tmp_path, capsys, fake_methods):
    task = tmp_path / "task.yaml"
    task.write_text((methods.CONFIG_DIR.parents[1] / DEMO / "inpainting_config.yaml").read_text().replace(
        "main_sampler: LD-SMC", "main_sampler: LD-SMC\n  method: fake")
        + "sampler:\n  num_particles: 4\n  num_steps: 50\n  refine_max_iters: 100\n")
    base = ["--task_config", task, "--save_dir", tmp_path, "--max_images", "1", "--threads", "1", "--seed", "0"]
    rc, _, err = cli(capsys, *base)
    assert rc == 0, err
    # a sampler section for LD-SMC (num_particles, num_steps, refine_max_iters): the fake method has only num_steps
    assert "skipping the task's sampler setting(s) num_particles, refine_max_iters" in err
    root = tmp_path / "fake" / "inpainting_box"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["sampler"] == {"num_steps": 50, "sigma_y": 0.01} and summary["method"] == "fake"
    # A result without ESS or selected particle: None in the record, a figure without the ESS panel.
    record = json.loads((root / "records" / "00000.json").read_text())
    assert record["final_ess"] is None and record["selected_particle"] is None
    assert (root / "figures" / "00000.png").is_file() and not (root / "recon_opt").exists()
    assert summary["comparison"]["psnr_recon_opt"] is None

    rc, _, err = cli(capsys, *base, "--method", "ltds", "--ddim_steps", "3", "--num_particles", "2",
                     "sampler.xhat_max_iters=20", "sampler.refine_max_iters=5", "--no_figures")
    assert rc == 0, err
    assert (tmp_path / "ltds" / "inpainting_box" / "summary.json").is_file()


def test_flags_and_overrides_the_method_lacks(tmp_path, capsys, fake_methods):
    base = ["--method", "fake", "--save_dir", tmp_path, "--max_images", "1", "--threads", "1"]
    err = error_line(capsys, *base, "--kappa1", "2")
    assert "--kappa1" in err and "'fake'" in err and "num_steps" in err
    err = error_line(capsys, *base, "--num_particles", "2")
    assert "--num_particles" in err and "'fake'" in err
    err = error_line(capsys, *base, "sampler.kappa2=3")
    assert "sampler.kappa2" in err and "'fake'" in err
    # a key no method has stays an error of the task config
    err = error_line(capsys, *base, "sampler.kappa3=3")
    assert "sampler.kappa3" in err
    assert cli(capsys, *base, "--ddim_steps", "3", "--no_figures")[0] == 0  # --ddim_steps is its num_steps


def test_unknown_and_not_applicable_methods(tmp_path, capsys, fake_methods):
    err = error_line(capsys, "--method", "nope", "--save_dir", tmp_path)
    assert "'nope'" in err and "ld_smc" in err and "ltds" in err
    err = error_line(capsys, "--method", "fake_linear", "--save_dir", tmp_path,
                     "--task_config", f"{DEMO}/phase_retrieval_config.yaml")
    assert "fake_linear" in err and "phase_retrieval" in err and "linear" in err
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.png"))

"""The evaluation protocol of sample_condition.py: per_image (ours) and release (the authors' re-seeding)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import guided_diffusion.methods as methods
import sample_condition
from conftest import ROOT

DIGIT = sorted((ROOT / "data" / "samples" / "demo").glob("*.png"))[0]
FAST = ["--task_config", "configs/tasks/demo/inpainting_random_config.yaml", "--ddim_steps", "3",
        "--num_particles", "2", "--seed", "0", "--threads", "1", "--no_figures", "--batch_size", "2",
        "sampler.xhat_max_iters=20", "sampler.refine_max_iters=5"]



@pytest.fixture()
def twins(tmp_path):
    """Two copies of one digit: any difference between their measurements comes from the random draws."""
    folder = tmp_path / "twins"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(DIGIT, folder / name)
    return folder


def run(capsys, monkeypatch, save_dir, *args):
    """Run the CLI; return the measurements y [B, ...] and the generators' first draws the method received."""
    seen = {}
    real = methods.Method.__call__

    def call(self, model, operator, y, generator=None, **kw):
        seen["y"] = y.clone()
        seen["draws"] = [torch.randn(4, generator=torch.Generator().set_state(g.get_state())) for g in generator]
        return real(self, model, operator, y, generator=generator, **kw)

    monkeypatch.setattr(methods.Method, "__call__", call)
    rc = sample_condition.main([str(a) for a in ["--save_dir", save_dir, *FAST, *args]])
    _, err = capsys.readouterr()
    assert rc == 0, err
    return seen


def masks(root):
    return [np.asarray(Image.open(root / "mask" / f"{i:05d}.png")) for i in (0, 1)]


def test_release_gives_every_image_the_same_draws(tmp_path, capsys, monkeypatch, twins):
    seen = run(capsys, monkeypatch, tmp_path / "rel", f"data.root={twins}", "--protocol", "release")
    root = tmp_path / "rel" / "ld_smc" / "inpainting_random"
    m0, m1 = masks(root)
    assert (m0 == m1).all()  # the same mask
    assert torch.equal(seen["y"][0], seen["y"][1])  # same image, same mask, same noise draw
    assert torch.equal(seen["draws"][0], seen["draws"][1])  # the sampler starts from the same draws
    for name in ("summary.json", "run.json"):
        assert json.loads((root / name).read_text())["protocol"] == "release"


def test_per_image_gives_each_image_its_own_draws(tmp_path, capsys, monkeypatch, twins):
    # the task says release; the flag wins
    seen = run(capsys, monkeypatch, tmp_path / "own", f"data.root={twins}", "protocol=release",
               "--protocol", "per_image")
    root = tmp_path / "own" / "ld_smc" / "inpainting_random"
    m0, m1 = masks(root)
    assert (m0 != m1).any()
    assert not torch.equal(seen["y"][0], seen["y"][1])
    assert not torch.equal(seen["draws"][0], seen["draws"][1])
    summary = json.loads((root / "summary.json").read_text())
    assert summary["protocol"] == "per_image" and summary["config"]["task"]["protocol"] == "per_image"
    # Image 0 is the same under both protocols: release is "everyone gets image 0's draws".
    rel = run(capsys, monkeypatch, tmp_path / "rel", f"data.root={twins}", "--protocol", "release")
    assert torch.equal(rel["y"][0], seen["y"][0])
    # A resume under the other protocol would mix two experiments: refused.
    rc = sample_condition.main([str(a) for a in ["--save_dir", tmp_path / "own", *FAST, f"data.root={twins}"]])
    assert rc == 0  # the task's own protocol is per_image: same settings, resumes
    rc = sample_condition.main([str(a) for a in ["--save_dir", tmp_path / "own", *FAST, f"data.root={twins}",
                                                 "--protocol", "release"]])
    assert rc == 2 and "protocol" in capsys.readouterr().err

"""The bundled demo LDM (models/demo): loads through the project's loader, reconstructs and samples digits."""
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT
from ldm import load_model

sys.path.insert(0, str(ROOT / "scripts"))
import train_demo  # noqa: E402

CONFIG = ROOT / "configs" / "models" / "demo.yaml"
CKPT = ROOT / "models" / "demo" / "demo_ldm.safetensors"
HELD_OUT = ROOT / "data" / "samples" / "demo"


@pytest.fixture(scope="module")
def model():
    return load_model(CONFIG)


@pytest.fixture(scope="module")
def held_out():
    files = sorted(HELD_OUT.glob("*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_shipped_files(model):
    assert CKPT.is_file() and CKPT.stat().st_size < 15e6
    assert model.latent_shape == (3, 8, 8) and model.image_shape == (3, 32, 32)
    cfg = yaml.safe_load(CONFIG.read_text())["model"]["params"]
    assert cfg["ckpt_path"] == "models/demo/demo_ldm.safetensors"
    assert model.scale_factor == pytest.approx(cfg["scale_factor"]) and model.scale_factor != 1.0
    # Same schedule as the FFHQ LDM, so the sampler's defaults apply.
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(model.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)


def test_held_out_digits_were_never_seen():
    """The held-out PNGs are exactly the digits the training script leaves out, and none is in its training set."""
    train, held, _, labels = train_demo.load_digits(0)
    files = sorted(HELD_OUT.glob("*.png"))
    assert len(files) == len(held) == 20
    shipped = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    assert torch.equal(shipped.permute(0, 3, 1, 2), ((held + 1) * 127.5).round().to(torch.uint8))
    assert list(labels) == [i % 10 for i in range(20)]
    dist = torch.cdist(held[:, 0].flatten(1), train[:, 0].flatten(1))
    assert dist.min() > 1.0  # no training digit equals a held-out one
    assert "CC BY-SA 3.0" in (HELD_OUT / "README.md").read_text()


def test_reconstructs_held_out_digits(model, held_out):
    with torch.no_grad():
        rec = model.decode(model.encode(held_out)).clamp(-1, 1)
    psnr = 10 * torch.log10(4.0 / ((rec - held_out) ** 2).flatten(1).mean(1))
    assert psnr.mean() > 20.0, psnr


def test_noise_prediction_beats_the_trivial_guess(model, held_out):
    """E|eps - eps_theta(z_t, t)|^2 on held-out latents is well below 1 (= predicting zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z0 = model.encode(held_out)
        for t in (50, 300, 700):
            abar = model.alphas_cumprod[t]
            eps = torch.randn(z0.shape, generator=g)
            z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
            err = ((model.eps(z_t, torch.full((len(z0),), t)) - eps) ** 2).mean()
            assert err < 0.5, (t, err)


def test_samples_look_like_digits(model, held_out):
    """Unconditional samples: dark background, a thin bright stroke, as in the data."""
    x = train_demo.ancestral_samples(model, 16, 50, torch.Generator().manual_seed(1))
    bright = float((x > 0).float().mean())       # stroke fraction
    ref = float((held_out > 0).float().mean())
    assert 0.03 < bright < 0.35 and bright == pytest.approx(ref, abs=0.08)
    border = torch.cat([x[..., :3, :].flatten(1), x[..., -3:, :].flatten(1)], 1)
    assert float(border.mean()) < -0.8  # black margins, like the padded digits
    assert float(x.std(0).mean()) > 0.2  # the samples differ from each other


def test_quick_training_runs(tmp_path):
    """`--quick` trains a tiny model for a few iterations and writes loadable weights, config and grids;
    a second run gives the same weights."""
    threads = torch.get_num_threads()
    try:
        report = train_demo.main(["--quick", "--out", str(tmp_path)])
        train_demo.main(["--quick", "--out", str(tmp_path / "again")])
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file
    first, second = load_file(tmp_path / "demo_ldm.safetensors"), load_file(tmp_path / "again" / "demo_ldm.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # seeded
    for name in ("demo_ldm.safetensors", "demo.yaml", "samples.png", "reconstructions.png"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "samples").glob("*.png"))) == 20
    m = load_model(tmp_path / "demo.yaml")
    assert m.image_shape == (3, 32, 32)
    assert m.scale_factor == pytest.approx(report["scale_factor"], rel=1e-6)

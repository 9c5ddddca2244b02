"""The full-size FFHQ / ImageNet LDMs built from our configs have exactly the CompVis keys,
shapes and parameter counts; the schedule; config errors name the offending key."""
import json

import pytest
import torch

from conftest import MANIFESTS, ROOT
from ldm import ConfigError, build_model
from ldm.schedule import alphas_cumprod_from_betas, linear_beta_schedule
from ldm_compact import single_thread  # noqa: F401  (autouse fixture)
from ldm_compact import load_io, compact_ldm_config

FFHQ_FIRST_STAGE_PARAMS = 55_322_782


@pytest.mark.parametrize("config, manifest", [("ffhq-ldm-vq-4.yaml", "ffhq_ldm_vq4_manifest.json"),
                                              ("cin256-v2.yaml", "cin256_v2_manifest.json")])
def test_full_size_model_matches_manifest(config, manifest):
    ref = json.loads((MANIFESTS / manifest).read_text())
    model = build_model(ROOT / "configs" / "models" / config, device="meta")
    got = {k: list(v.shape) for k, v in model.state_dict_compvis().items()}
    assert sorted(set(got) - set(ref["keys"])) == []
    assert sorted(set(ref["keys"]) - set(got)) == []
    assert got == ref["keys"]
    assert sum(p.numel() for p in model.unet.parameters()) == ref["unet_params"]
    assert sum(p.numel() for p in model.first_stage.parameters()) == ref.get("first_stage_params",
                                                                             FFHQ_FIRST_STAGE_PARAMS)
    assert model.latent_shape == (3, 64, 64) and model.image_shape == (3, 256, 256)
    assert model.num_timesteps == 1000


def test_linear_schedule_matches_compvis():
    io = load_io("compact_ldm_io.pt")
    betas = linear_beta_schedule(1000, 0.0015, 0.0195)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(0.0015, rel=1e-12) and betas[-1].item() == pytest.approx(0.0195, rel=1e-12)
    torch.testing.assert_close(alphas_cumprod_from_betas(betas), io["alphas_cumprod_float64"], rtol=1e-12, atol=0)


def test_config_errors_name_the_key():
    cfg = compact_ldm_config()
    cfg["model"]["params"]["linear_stat"] = 0.001
    with pytest.raises(ConfigError, match=r"model\.params\.linear_stat"):
        build_model(cfg, device="meta")

    cfg = compact_ldm_config()
    cfg["model"]["params"]["unet_config"]["params"]["num_head_channel"] = 8
    with pytest.raises(ConfigError, match="num_head_channel"):
        build_model(cfg, device="meta")

    cfg = compact_ldm_config()
    cfg["model"]["params"]["first_stage_config"]["target"] = "ldm.models.autoencoder.AutoencoderKL"
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        build_model(cfg, device="meta")

    cfg = compact_ldm_config()
    cfg["model"]["params"]["parameterization"] = "x0"
    with pytest.raises(ConfigError, match="parameterization"):
        build_model(cfg, device="meta")


@pytest.mark.parametrize("name", ["ffhq-ldm-vq-4.yaml", "cin256-v2.yaml"])
def test_authors_config_paths_point_to_our_configs(name):
    """The authors' --ldm_config paths (configs/latent-diffusion/*.yaml) are our model configs."""
    theirs, ours = ROOT / "configs" / "latent-diffusion" / name, ROOT / "configs" / "models" / name
    assert theirs.is_file() and theirs.read_text() == ours.read_text()

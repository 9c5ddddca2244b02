"""Configs of the compact reference LDMs in tests/fixtures/compact, built from their *_io.pt files."""
import pytest
import torch

from conftest import COMPACT

COMPACT_LDM_CKPT = COMPACT / "compact_ldm.ckpt"
COMPACT_LDM_LIGHTNING_CKPT = COMPACT / "compact_ldm_lightning.ckpt"
COMPACT_CIN_CKPT = COMPACT / "compact_cin.ckpt"


def load_io(name: str) -> dict:
    return torch.load(COMPACT / name, weights_only=True)


def compact_ldm_config(ckpt=None, first_stage_ckpt=None) -> dict:
    """Our config layout for compact_ldm.ckpt (unconditional, VQ first stage, f = 4)."""
    io = load_io("compact_ldm_io.pt")
    fs_params = {"embed_dim": io["embed_dim"], "n_embed": io["n_embed"], "ddconfig": io["ddconfig"],
                 "lossconfig": {"target": "torch.nn.Identity"}}
    if first_stage_ckpt is not None:
        fs_params["ckpt_path"] = str(first_stage_ckpt)
    params = {"linear_start": io["linear_start"], "linear_end": io["linear_end"], "timesteps": io["timesteps"],
              "image_size": io["unet_config"]["image_size"],
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                              "params": dict(io["unet_config"])},
              "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": fs_params},
              "cond_stage_config": "__is_unconditional__"}
    if ckpt is not None:
        params["ckpt_path"] = str(ckpt)
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def compact_cin_config(ckpt=COMPACT_CIN_CKPT, first_stage_ckpt=COMPACT_LDM_CKPT) -> dict:
    """Config for compact_cin.ckpt: spatial-transformer UNet + class embedder; the checkpoint has no
    first stage, so the VQ of compact_ldm.ckpt is loaded as the standalone first stage."""
    io = load_io("compact_cin_io.pt")
    cfg = compact_ldm_config(ckpt=ckpt, first_stage_ckpt=first_stage_ckpt)
    params = cfg["model"]["params"]
    params["unet_config"]["params"] = dict(io["unet_config"])
    params["conditioning_key"] = "crossattn"
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                   "params": {"n_classes": io["n_classes"],
                                              "embed_dim": io["unet_config"]["context_dim"], "key": "class_label"}}
    return cfg


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The compact models are tiny: one intra-op thread is faster than two, and much faster
    than two on a busy machine (oversubscription). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

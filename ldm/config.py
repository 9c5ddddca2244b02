"""Reading model configs (ours and the original CompVis YAML files) and building / loading models.

A config is the CompVis layout::

    model:
      target: ldm.models.diffusion.ddpm.LatentDiffusion   # read as data, never imported
      params:
        ckpt_path: models/ldm/ffhq/model.ckpt              # ours: the combined checkpoint
        linear_start: 0.0015; linear_end: 0.0195; timesteps: 1000; scale_factor: 1.0
        unet_config: {target: ...UNetModel, params: {...}}
        first_stage_config: {target: ...VQModelInterface, params: {ckpt_path: ..., ddconfig: ..., ...}}
        cond_stage_config: __is_unconditional__ | {target: ...ClassEmbedder, params: {...}}

``target`` strings are mapped to our classes by their last component.
"""
import os

import torch
import yaml

from .checkpoint import (CheckpointMismatchError, assemble_state, check_schedule, read_checkpoint,
                         require_file, resolve_path)
from .model import LatentDiffusion
from .modules.attention import check_attention_backend
from .modules.autoencoder import VQModel
from .modules.embedders import ClassEmbedder
from .modules.unet import UNetModel
from .schedule import linear_beta_schedule

# model.params keys that only concern training or logging: accepted and ignored.
TRAINING_ONLY_KEYS = {
    "base_learning_rate", "num_timesteps_cond", "log_every_t", "first_stage_key", "cond_stage_key",
    "image_size", "channels", "monitor", "cond_stage_trainable", "use_ema", "loss_type", "ignore_keys",
    "load_only_unet", "original_elbo_weight", "l_simple_weight", "learn_logvar", "logvar_init",
    "clip_denoised", "use_positional_encodings", "scheduler_config", "cosine_s", "make_it_fit",
    "reset_ema", "reset_num_ema_updates", "ucg_training", "concat_mode", "ckpt_path",
    "num_timesteps", "embedding_reg_weight",
}
FIRST_STAGE_IGNORED_KEYS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels",
                            "monitor", "batch_resize_range", "scheduler_config", "lr_g_factor",
                            "sane_index_shape", "n_embed", "embed_dim", "ddconfig", "remap", "use_ema"}
LDM_TARGETS = ("LatentDiffusion",)
FIRST_STAGE_TARGETS = ("VQModelInterface", "VQModel")


class ConfigError(ValueError):
    """A model config is malformed or asks for something this implementation does not support."""


def _target_name(section: dict, where: str) -> str:
    if not isinstance(section, dict) or "target" not in section:
        raise ConfigError(f"{where} needs a 'target' entry (CompVis layout: target + params)")
    return str(section["target"]).rsplit(".", 1)[-1]


def read_config(config: str | os.PathLike | dict) -> dict:
    """The ``model`` section of a YAML config file (path resolved from cwd, then the project root) or dict."""
    if not isinstance(config, dict):
        path = resolve_path(config)
        if not path.is_file():
            raise FileNotFoundError(f"model config {config} not found (tried the current directory and the project root)")
        config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError("a model config needs a top-level 'model' section (CompVis layout)")
    return config["model"]


def _check_ldm_params(params: dict) -> None:
    for key in params:
        if key in ("unet_config", "first_stage_config", "cond_stage_config", "linear_start", "linear_end",
                   "timesteps", "beta_schedule", "scale_factor", "scale_by_std", "conditioning_key",
                   "parameterization", "given_betas", "v_posterior", "cond_stage_forward") or key in TRAINING_ONLY_KEYS:
            continue
        raise ConfigError(f"unknown key model.params.{key} in the model config: remove it or check its spelling")
    if params.get("beta_schedule", "linear") != "linear":
        raise ConfigError(f"model.params.beta_schedule={params['beta_schedule']!r}: only 'linear' is supported")
    if params.get("parameterization", "eps") != "eps":
        raise ConfigError(f"model.params.parameterization={params['parameterization']!r}: only 'eps' is supported")
    if params.get("given_betas") is not None:
        raise ConfigError("model.params.given_betas is not supported: use linear_start/linear_end")
    if params.get("v_posterior", 0.0) != 0.0:
        raise ConfigError("model.params.v_posterior must be 0 (the released LDMs use 0)")
    if params.get("cond_stage_forward") is not None:
        raise ConfigError("model.params.cond_stage_forward is not supported")
    if params.get("conditioning_key") not in (None, "crossattn"):
        raise ConfigError(f"model.params.conditioning_key={params['conditioning_key']!r}: only cross-attention "
                          "('crossattn') or unconditional models are supported")


def _build_cond_stage(cfg) -> ClassEmbedder | None:
    if cfg is None or cfg == "__is_unconditional__":
        return None
    if cfg == "__is_first_stage__":
        raise ConfigError("model.params.cond_stage_config: '__is_first_stage__' is not supported")
    name = _target_name(cfg, "model.params.cond_stage_config")
    if name != "ClassEmbedder":
        raise ConfigError(f"model.params.cond_stage_config.target {cfg['target']!r}: only ClassEmbedder is supported")
    try:
        return ClassEmbedder(**cfg.get("params", {}))
    except TypeError as e:
        raise ConfigError(f"model.params.cond_stage_config.params: {e}") from None


def _build_first_stage(cfg) -> VQModel:
    name = _target_name(cfg, "model.params.first_stage_config")
    if name not in FIRST_STAGE_TARGETS:
        raise ConfigError(f"model.params.first_stage_config.target {cfg['target']!r}: only VQ first stages "
                          f"({', '.join(FIRST_STAGE_TARGETS)}) are supported")
    params = cfg.get("params", {})
    for key in params:
        if key not in FIRST_STAGE_IGNORED_KEYS:
            raise ConfigError(f"unknown key model.params.first_stage_config.params.{key}")
    for key in ("ddconfig", "n_embed", "embed_dim"):
        if key not in params:
            raise ConfigError(f"model.params.first_stage_config.params.{key} is required")
    if params.get("remap") is not None:
        raise ConfigError("model.params.first_stage_config.params.remap is not supported")
    if params.get("use_ema"):
        raise ConfigError("model.params.first_stage_config.params.use_ema is not supported")
    if params["ddconfig"].get("attn_type", "vanilla") != "vanilla":
        raise ConfigError("model.params.first_stage_config.params.ddconfig.attn_type: only 'vanilla' is supported")
    return VQModel(params["ddconfig"], params["n_embed"], params["embed_dim"])


def build_model(config: str | os.PathLike | dict, device: str | torch.device = "cpu") -> LatentDiffusion:
    """Build the (randomly initialised) LatentDiffusion a config describes, on ``device``
    (``"meta"`` builds shapes only)."""
    model_cfg = read_config(config)
    name = _target_name(model_cfg, "model")
    if name not in LDM_TARGETS:
        raise ConfigError(f"model.target {model_cfg['target']!r}: only LatentDiffusion models are supported")
    params = model_cfg.get("params", {})
    _check_ldm_params(params)
    for key in ("unet_config", "first_stage_config"):
        if key not in params:
            raise ConfigError(f"model.params.{key} is required")
    if _target_name(params["unet_config"], "model.params.unet_config") != "UNetModel":
        raise ConfigError(f"model.params.unet_config.target {params['unet_config']['target']!r}: only UNetModel")
    cond_cfg = params.get("cond_stage_config", "__is_unconditional__")
    if (cond_cfg not in (None, "__is_unconditional__")) != (params.get("conditioning_key") == "crossattn"):
        raise ConfigError("a cond_stage_config needs model.params.conditioning_key: crossattn, and vice versa")
    betas = linear_beta_schedule(params.get("timesteps", 1000), params.get("linear_start", 0.0015),
                                 params.get("linear_end", 0.0195))
    with torch.device(device):
        try:
            unet = UNetModel(**params["unet_config"].get("params", {}))
        except TypeError as e:
            raise ConfigError(f"model.params.unet_config.params: {e}") from None
        first_stage = _build_first_stage(params["first_stage_config"])
        cond_stage = _build_cond_stage(cond_cfg)
        model = LatentDiffusion(unet, first_stage, betas, cond_stage=cond_stage,
                                scale_factor=params.get("scale_factor", 1.0), latent_size=params.get("image_size"))
    model.scale_by_std = bool(params.get("scale_by_std", False))
    model.config = model_cfg
    return model.eval()


def load_model(config: str | os.PathLike | dict, device: str | torch.device = "cpu",
               ckpt: str | os.PathLike | None = None, first_stage_ckpt: str | os.PathLike | None = None,
               use_ema: bool = False, attention: str = "sdpa") -> LatentDiffusion:
    """Build the model a config describes and load its weights, strictly.

    ckpt: the combined LDM checkpoint (default: model.params.ckpt_path of the config);
    first_stage_ckpt: a standalone VQ first stage (default: first_stage_config.params.ckpt_path);
    it replaces the combined file's first stage. use_ema loads the UNet's LitEma weights.
    Returns the model in eval mode with requires_grad False on every parameter.
    Raises CheckpointNotFoundError (with the download command), CheckpointMismatchError, ConfigError.
    """
    check_attention_backend(attention)
    model_cfg = read_config(config)
    params = model_cfg.get("params", {})
    fs_cfg = params.get("first_stage_config")
    fs_params = fs_cfg.get("params", {}) if isinstance(fs_cfg, dict) else {}
    # An empty path in a config means "none".
    ckpt = ckpt if ckpt is not None else (params.get("ckpt_path") or None)
    first_stage_ckpt = first_stage_ckpt if first_stage_ckpt is not None else (fs_params.get("ckpt_path") or None)
    if ckpt is None and first_stage_ckpt is None:
        raise ConfigError("no checkpoint to load: pass ckpt=... or set model.params.ckpt_path in the config")
    paths = [require_file(p) for p in (ckpt, first_stage_ckpt) if p is not None]  # fail early, before reading

    model = build_model({"model": model_cfg}, device="meta")
    ckpt_state = read_checkpoint(paths[0]) if ckpt is not None else None
    fs_state = read_checkpoint(paths[-1]) if first_stage_ckpt is not None else None
    expected = {k: v.shape for k, v in model.state_dict_compvis().items()}
    sources = ", ".join(str(p) for p in paths)
    state = assemble_state(expected, ckpt_state, fs_state, use_ema, sources)
    if ckpt_state is not None:
        check_schedule(ckpt_state, model.betas_float64)
        if "scale_factor" in ckpt_state:
            stored = float(ckpt_state["scale_factor"])
            if model.scale_by_std:
                model.scale_factor = stored
            elif abs(stored - model.scale_factor) > 1e-6 * max(1.0, abs(stored)):
                raise CheckpointMismatchError(
                    f"the checkpoint's scale_factor {stored} differs from the config's "
                    f"model.params.scale_factor {model.scale_factor}: set it in the config")
        elif model.scale_by_std:
            raise CheckpointMismatchError("scale_by_std is set but the checkpoint holds no scale_factor")

    model.load_state_dict_compvis({k: v.float() for k, v in state.items()}, assign=True)
    model = model.to(device)
    model.set_schedule(model.betas_float64)
    model.set_attention(attention)
    model.requires_grad_(False)
    return model.eval()

"""Reading CompVis / Lightning / safetensors checkpoints safely, with a strict key check.

Accepted files (``.ckpt``/``.pt``/``.pth`` pickles in torch's zip or legacy format, or ``.safetensors``):

- a combined LDM checkpoint: ``{"state_dict": {...}}`` (or the bare dict) with
  ``model.diffusion_model.*``, ``first_stage_model.*``, optional ``cond_stage_model.*``,
  optional schedule buffers (``betas``, ``alphas_cumprod``, ...), ``scale_factor`` and
  LitEma weights ``model_ema.<param name without dots>`` (+ ``model_ema.decay``, ``model_ema.num_updates``);
- a standalone VQ first stage (``encoder.*``, ``decoder.*``, ``quantize.*``, ``quant_conv.*``,
  ``post_quant_conv.*``; its ``loss.*`` keys are dropped).

Pickles are read with torch's ``weights_only`` loader, and, when that refuses a Lightning
checkpoint, with the restricted unpickler of :mod:`ldm.safe_pickle`: never with plain pickle.
"""
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safe_pickle
from .schedule import compvis_schedule_buffers

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_KEYS = tuple(compvis_schedule_buffers(torch.linspace(0.1, 0.2, 3, dtype=torch.float64)))
IGNORED_EXTRA_KEYS = ("lvlb_weights", "logvar")

# Path fragment -> argument of scripts/download_models.sh that fetches it.
DOWNLOAD_TARGETS = {"ldm/ffhq": "ffhq", "vq-f4": "vq-f4", "cin256-v2": "cin256-v2"}


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint file is missing; the message says how to get it."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys, shapes or schedule do not match the model built from the config."""


class CheckpointReadError(CheckpointMismatchError):
    """A checkpoint file cannot be read at all (truncated, corrupted, or not a checkpoint); the message names it."""


def _unreadable(path: Path, e: BaseException) -> CheckpointReadError:
    text = str(e).strip()
    detail = text.splitlines()[0].split(". ")[0][:200] if text else "the file ends too early"
    return CheckpointReadError(
        f"checkpoint {path} cannot be read ({type(e).__name__}: {detail}): the file is truncated, "
        f"corrupted or not a checkpoint; download it again (see docs/models.md) or check the path")


def resolve_path(path: str | os.PathLike) -> Path:
    """A relative path is looked up in the current directory first, then in the project root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    candidate = PROJECT_ROOT / path
    return candidate if candidate.exists() else path


def require_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """Resolve ``path`` or raise CheckpointNotFoundError with the command that downloads it."""
    resolved = resolve_path(path)
    if resolved.is_file():
        return resolved
    hint = next((f"bash scripts/download_models.sh {arg}" for frag, arg in DOWNLOAD_TARGETS.items()
                 if frag in Path(path).as_posix()), None)
    how = (f"run: {hint}" if hint else
           "check the path (relative paths are tried from the current directory, then the project root)")
    raise CheckpointNotFoundError(f"{what} {path} not found; {how} (see docs/models.md)")


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict on the CPU (the ``state_dict`` part
    when the file holds one). Pickled code is never run; see :mod:`ldm.safe_pickle`."""
    path = require_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError (and others) on a damaged file
            raise _unreadable(path, e) from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # A Lightning checkpoint (or something worse): the restricted unpickler decides.
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
    except safe_pickle.UnsafeCheckpointError as e:
        raise safe_pickle.UnsafeCheckpointError(f"{path}: {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            UnicodeDecodeError, KeyError, AttributeError, ImportError, IndexError, TypeError) as e:
        raise _unreadable(path, e) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path} holds no state_dict of tensors (found {type(obj).__name__})")
    return dict(obj)


def first_stage_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first-stage weights (VQModel names) from a combined or a standalone checkpoint."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def ema_key(unet_param: str) -> str:
    """LitEma name of a UNet parameter: 'input_blocks.0.0.weight' -> 'model_ema.diffusion_modelinput_blocks00weight'."""
    return "model_ema." + ("diffusion_model." + unet_param).replace(".", "")


def ema_unet_weights(state: dict[str, torch.Tensor], unet_params: list[str]) -> dict[str, torch.Tensor]:
    """The EMA copy of the UNet parameters, under UNet names; error if the file has none or some are missing."""
    if not any(k.startswith("model_ema.") for k in state):
        raise CheckpointMismatchError("use_ema=True but the checkpoint holds no model_ema.* weights; "
                                      "load with use_ema=False")
    missing = [n for n in unet_params if ema_key(n) not in state]
    if missing:
        raise CheckpointMismatchError(f"use_ema=True but {len(missing)} UNet parameters have no EMA copy, "
                                      f"e.g. {[ema_key(n) for n in missing[:3]]}")
    return {n: state[ema_key(n)] for n in unet_params}


def check_schedule(state: dict[str, torch.Tensor], betas: torch.Tensor, rtol: float = 1e-4) -> None:
    """Check the schedule buffers a checkpoint carries against the config's betas (float64)."""
    expected = compvis_schedule_buffers(betas)
    for name, ref in expected.items():
        if name not in state:
            continue
        got = state[name].detach().double().cpu()
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=rtol, atol=1e-6 * ref.abs().max().item()):
            raise CheckpointMismatchError(
                f"the checkpoint's schedule buffer {name!r} (shape {tuple(got.shape)}) does not match the config's "
                f"schedule (linear_start/linear_end/timesteps): fix the config to the checkpoint's schedule")


@dataclass
class KeyReport:
    """Missing, unexpected and wrongly shaped keys of a checkpoint against a model."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    @staticmethod
    def _grouped(keys: list[str], examples: int = 3) -> list[str]:
        groups: dict[str, list[str]] = {}
        for k in keys:
            parts = k.split(".")
            groups.setdefault(".".join(parts[:3]) if parts[0] == "model" else ".".join(parts[:2]), []).append(k)
        return [f"    {prefix}.* : {len(ks)} keys, e.g. {', '.join(ks[:examples])}" for prefix, ks in groups.items()]

    def __str__(self) -> str:
        lines = []
        if self.missing:
            lines += [f"  missing ({len(self.missing)}):"] + self._grouped(self.missing)
        if self.unexpected:
            lines += [f"  unexpected ({len(self.unexpected)}):"] + self._grouped(self.unexpected)
        if self.shape_mismatch:
            lines += [f"  wrong shape ({len(self.shape_mismatch)}):"]
            lines += [f"    {k}: checkpoint {list(got)} vs model {list(want)}" for k, got, want in self.shape_mismatch[:10]]
        return "\n".join(lines) if lines else "  all keys match"


def compare_keys(expected: dict[str, torch.Size], found: dict[str, torch.Tensor]) -> KeyReport:
    """KeyReport of ``found`` tensors against the ``expected`` name -> shape map."""
    report = KeyReport(missing=[k for k in expected if k not in found],
                       unexpected=[k for k in found if k not in expected])
    report.shape_mismatch = [(k, tuple(found[k].shape), tuple(expected[k])) for k in expected
                             if k in found and tuple(found[k].shape) != tuple(expected[k])]
    return report


def assemble_state(expected: dict[str, torch.Size], ckpt_state: dict[str, torch.Tensor] | None,
                   first_stage_state: dict[str, torch.Tensor] | None, use_ema: bool,
                   sources: str) -> dict[str, torch.Tensor]:
    """The CompVis-named state to load: the combined checkpoint, with the UNet replaced by its
    EMA copy when use_ema, and the first stage replaced by the standalone file when given.
    Raises CheckpointMismatchError with a KeyReport when anything is missing, extra or misshapen."""
    state = {}
    for k, v in (ckpt_state or {}).items():
        if k in SCHEDULE_KEYS or k in IGNORED_EXTRA_KEYS or k == "scale_factor" or k.startswith("model_ema."):
            continue
        state[k] = v
    if use_ema:
        if ckpt_state is None:
            raise CheckpointMismatchError("use_ema=True needs a combined LDM checkpoint (ckpt=...)")
        unet = [k[len("model.diffusion_model."):] for k in expected if k.startswith("model.diffusion_model.")]
        for name, tensor in ema_unet_weights(ckpt_state, unet).items():
            state["model.diffusion_model." + name] = tensor
    if first_stage_state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
        state.update({"first_stage_model." + k: v for k, v in first_stage_weights(first_stage_state).items()})
    report = compare_keys(expected, state)
    if not report.ok:
        raise CheckpointMismatchError(f"checkpoint keys do not match the model built from the config "
                                      f"({sources}):\n{report}")
    return state


def save_model(model, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as one combined ``.safetensors`` file with CompVis key names
    (plus ``betas``, ``alphas_cumprod`` and ``scale_factor``), loadable by ``load_model(ckpt=path)``."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_model writes .safetensors files; got {path}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict_compvis().items()}
    tensors["betas"] = model.betas.detach().cpu().float().contiguous()
    tensors["alphas_cumprod"] = model.alphas_cumprod.detach().cpu().float().contiguous()
    tensors["scale_factor"] = torch.tensor(model.scale_factor, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "ld-smc compvis-combined", **(metadata or {})})
    return path

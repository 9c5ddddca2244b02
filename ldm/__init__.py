"""Latent diffusion models (CompVis-checkpoint compatible) and checkpoint loading."""
__version__ = "0.1.0"

from .checkpoint import CheckpointMismatchError, CheckpointNotFoundError, save_model  # noqa: E402
from .config import ConfigError, build_model, load_model  # noqa: E402
from .model import LatentDiffusion  # noqa: E402

__all__ = ["load_model", "build_model", "save_model", "LatentDiffusion", "CheckpointNotFoundError",
           "CheckpointMismatchError", "ConfigError", "__version__"]

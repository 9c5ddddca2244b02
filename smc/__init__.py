"""LD-SMC sampler (spec `ld-smc.md`): `LDSMCConfig`, `ld_smc_sample`, and its parts."""
from .config import PRESETS, LDSMCConfig
from .densities import NonFiniteWeightsError
from .draws import DrawSource, GeneratorDraws
from .ld_smc import LDSMCResult, TransitionState, ld_smc_sample
from .levels import make_chain, num_transitions
from .resampling import ess, per_image_generators, resample
from .schedule import strided_timesteps

__all__ = ["LDSMCConfig", "PRESETS", "ld_smc_sample", "LDSMCResult", "TransitionState",
           "NonFiniteWeightsError", "DrawSource", "GeneratorDraws", "make_chain", "num_transitions",
           "ess", "resample", "per_image_generators", "strided_timesteps"]

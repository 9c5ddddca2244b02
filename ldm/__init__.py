"""Latent diffusion models (CompVis-checkpoint compatible) and checkpoint loading."""
__version__ = "0.1.0"

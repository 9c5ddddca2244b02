"""Measurement operators and noise models with the DPS names (see measurements.py)."""

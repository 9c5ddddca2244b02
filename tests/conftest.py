"""Shared test configuration: paths to the fixtures in tests/fixtures/ (see its README)."""
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
COMPACT = FIXTURES / "compact"
MANIFESTS = FIXTURES / "reference-ldm"
DPS_OPERATORS = FIXTURES / "dps-operators"
RELEASE_REPLAY = FIXTURES / "ldsmc-release"
SAMPLE_IMAGES = ROOT / "data" / "samples"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


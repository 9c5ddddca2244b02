"""Shared test configuration: paths to the read-only fixtures beside the project."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
REFERENCE_LDM = FIXTURES / "reference-ldm"
DPS_OPERATORS = FIXTURES / "dps-operators"
FFHQ_SAMPLES = SHARED / "data" / "ffhq-samples"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        raise FileNotFoundError(
            f"the shared fixtures folder {SHARED} is missing: tests expect ../shared beside the project")
    return SHARED

"""Shared test configuration: paths to the fixtures in tests/fixtures/ (see its README)."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
COMPACT = FIXTURES / "compact"
MANIFESTS = FIXTURES / "reference-ldm"
DPS_OPERATORS = FIXTURES / "dps-operators"
RELEASE_REPLAY = FIXTURES / "ldsmc-release"
SAMPLE_IMAGES = ROOT / "data" / "samples"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))



@pytest.fixture(autouse=True)
def keep_thread_count():
    """The CLI's --threads (and the grid runner) set torch's global thread count: put it back for
    the tests that follow."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def cli(capsys, *args):
    """Run sample_condition.py in-process; returns (exit code, stdout, stderr)."""
    import sample_condition

    rc = sample_condition.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err

"""scripts/bench_smc.py runs on CPU with the fixture LDM and reports the per-transition calls."""
import importlib.util

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow


def load_script():
    spec = importlib.util.spec_from_file_location("bench_smc", ROOT / "scripts" / "bench_smc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smc_small_fixture(capsys):
    bench = load_script()
    threads = torch.get_num_threads()
    try:
        bench.main(["--small-fixture", "--device", "cpu", "--steps", "4", "--particles", "2",
                    "--xhat-iters", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # N, s/transition, s/transition/image, UNet fwd, UNet bwd, dec fwd, dec bwd, ...
    # reference chain (start_at_T): levels 1000 (abar_999), 999, 666, 333, 0; the callbacks after the
    # first and the third-from-last transition bracket 999 -> 666 (D(zbar0) fwd+bwd, D(z) fwd) and
    # 666 -> 333 (t' <= s = 333: D(mu) fwd+bwd for g2 too), so 2.5 decoder fwd and 1.5 bwd on average
    assert cells[3:7] == ["1.00", "1.00", "2.50", "1.50"], row
    assert float(cells[1]) > 0


def test_bench_smc_rejects_short_schedule():
    with pytest.raises(SystemExit):
        load_script().parse_args(["--small-fixture", "--steps", "3"])

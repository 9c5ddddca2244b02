"""The `reference` preset is the authors' release: scripts/check_release_replay.py feeds the
recorded draws of the release (tests/fixtures/ldsmc-release) to our sampler and compares every
recorded per-step quantity; it must pass, and it must fail when a release switch is off."""
import importlib.util

import pytest

from conftest import RELEASE_REPLAY, ROOT
from ldm_compact import single_thread  # noqa: F401 (autouse: one thread)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_release_replay",
                                                  ROOT / "scripts" / "check_release_replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recordings(check):
    return {J: check.load_recording(RELEASE_REPLAY / f"replay_J{J}.pt") for J in (1, 2)}


@pytest.fixture(scope="module")
def model(check, recordings):
    return check.compact_model(recordings[1], check.COMPACT / "compact_ldm.ckpt")


@pytest.mark.parametrize("J", [1, 2])
def test_reference_reproduces_the_release_step_by_step(check, capsys, J):
    assert check.main([str(RELEASE_REPLAY / f"replay_J{J}.pt")]) == 0
    out = capsys.readouterr().out
    assert "reproduced: every recorded quantity" in out
    # every kind of recorded quantity was compared (not skipped)
    for name in ("aux.x_hat_end", "aux.z_path", "ys", "init.log_weights", "transitions.g1",
                 "transitions.g2_norm_raw", "transitions.proposal_mean", "transitions.ancestors",
                 "transitions.log_prior", "transitions.log_pi", "transitions.ll_y0_ztp1",
                 "final.z_path_selected", "refine.iterates", "outputs.x0_opt"):
        assert f"\n{name} " in out, name


def test_the_omitted_tensors_of_J2_come_from_J1(recordings):
    g0 = recordings[2]["gibbs"][0]
    assert "omitted" in g0 and g0["ys"] is not None and g0["transitions"][3]["g1"] is not None


@pytest.mark.parametrize("J, switch, value, failing", [
    (1, "log_prior_new_moments", False, "transitions.log_prior"),
    (1, "start_at_T", False, "draw sequence"),
    (1, "aux_one_step_below", False, "draw sequence"),
    (1, "refine_return", "best", "refine.z0_opt"),
    (2, "refine_each_gibbs", False, "refine ran"),
    (1, "log_density", "sum", "init.log_weights"),
])
def test_the_check_fails_when_a_release_switch_is_off(check, recordings, model, J, switch, value, failing):
    c = check.replay(recordings[J], {switch: value}, model=model)
    assert any(name.startswith(failing) for name in c.failing(1e-5)), c.failing(1e-5)

"""The methods registry (guided_diffusion.methods): names, YAML defaults, overrides, errors."""
import dataclasses

import pytest
import torch

from guided_diffusion.measurements import get_operator
from guided_diffusion.methods import (MethodError, MethodNotApplicableError, available_methods, get_method,
                                      method_defaults)
from smc import LDSMCConfig, ld_smc_sample
from smc.closed_form import make_toy_problem


def test_ld_smc_yaml_states_the_sampler_defaults():
    """configs/methods/ld_smc.yaml lists the authors' values; they are LDSMCConfig's own defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(LDSMCConfig)}
    for key, value in method_defaults("ld_smc").items():
        assert defaults[key] == value, key


def test_overrides_win_and_unknown_settings_are_named():
    m = get_method("ld_smc", num_particles=5, kappa1=0.5)
    assert (m.config.num_particles, m.config.kappa1, m.config.kappa2) == (5, 0.5, 2.5)
    with pytest.raises(MethodError, match=r"no setting\(s\) \['zeta'\]"):
        get_method("ld_smc", zeta=1.0)
    with pytest.raises(MethodError, match="unknown method 'dps'.*ld_smc"):
        get_method("dps")
    with pytest.raises(MethodError, match="num_particles"):
        get_method("ld_smc", num_particles=0)


def test_ltds_is_ld_smc_without_auxiliary_observations():
    assert {"ld_smc", "ltds"} <= set(available_methods())
    m = get_method("ltds", num_steps=6, num_particles=2, kappa1=0.05, sigma_y=0.3, refine=False)
    assert m.config.aux_observations is False and m.num_callbacks(1000) == 6   # start_at_T: one more
    with pytest.raises(MethodError, match="aux_observations must stay False"):
        get_method("ltds", aux_observations=True)
    model, op, y0, _ = make_toy_problem(sigma_y=0.3)
    steps = []
    res = m(model, op, y0[None], generator=torch.Generator().manual_seed(1), callback=steps.append)
    direct = ld_smc_sample(model, op, y0[None], LDSMCConfig(**{**m.settings(), "preset": "reference"}),
                           generator=torch.Generator().manual_seed(1))
    assert len(steps) == 6 and torch.equal(res.x0, direct.x0)


def test_a_linear_only_method_refuses_a_nonlinear_operator():
    from guided_diffusion.methods import METHODS, Method

    spec = dataclasses.replace(METHODS["ltds"], linear_only=True)
    op = get_operator("phase_retrieval", oversample=0.0)
    with pytest.raises(MethodNotApplicableError, match="'ltds' needs a linear operator.*'phase_retrieval'"):
        Method(spec, get_method("ltds").config).check_applicable(op)

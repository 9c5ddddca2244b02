"""The model protocol (ldm/interface.py): what a sampler needs, a model without `device`, and
errors that name a missing member."""
import pytest
import torch

from ldm.interface import REQUIRED, ModelProtocolError, check_model, model_device
from smc import LDSMCConfig, ld_smc_sample
from smc.closed_form import make_toy_problem

CFG = dict(num_particles=2, num_steps=6, kappa1=0.05, kappa2=0.1, s=3, sigma_y=0.3, refine=False,
           xhat_max_iters=5)


class Without:
    """The closed-form model with some members hidden (a class without them, not a deletion)."""

    def __init__(self, model, hidden):
        self._model, self._hidden = model, set(hidden)

    def __getattr__(self, name):
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._model, name)


def test_protocol_lists_the_members_the_readme_names():
    assert REQUIRED == ("eps", "decode", "encode", "alphas_cumprod", "latent_shape")


def test_a_model_without_device_runs_on_the_device_of_its_schedule():
    model, op, y0, _ = make_toy_problem(sigma_y=0.3)
    bare = Without(model, ["device"])
    assert not hasattr(bare, "device") and model_device(bare) == model.alphas_cumprod.device
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = ld_smc_sample(bare, op, y0[None], LDSMCConfig(**CFG), generator=g())
    b = ld_smc_sample(model, op, y0[None], LDSMCConfig(**CFG), generator=g())
    assert torch.equal(a.x0, b.x0)


@pytest.mark.parametrize("member", ["eps", "decode", "encode", "alphas_cumprod", "latent_shape"])
def test_a_missing_member_is_named(member):
    model, op, y0, _ = make_toy_problem(sigma_y=0.3)
    with pytest.raises(ModelProtocolError, match=f"lacks '{member}'.*ldm/interface.py"):
        ld_smc_sample(Without(model, [member]), op, y0[None], LDSMCConfig(**CFG),
                      generator=torch.Generator().manual_seed(0))


def test_latent_tds_does_not_need_an_encoder():
    model, op, y0, _ = make_toy_problem(sigma_y=0.3)
    res = ld_smc_sample(Without(model, ["encode"]), op, y0[None],
                        LDSMCConfig(**CFG, aux_observations=False), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.x0).all()


def test_alphas_cumprod_must_be_a_1d_tensor():
    class Bad:
        eps = decode = encode = None
        latent_shape = (2,)
        alphas_cumprod = [0.9, 0.5]
    with pytest.raises(ModelProtocolError, match="1-D tensor"):
        check_model(Bad())

"""The paper's baselines on the methods interface (guided_diffusion.methods): YAML defaults, the
compact LDM (shapes, callbacks, call counts, batch independence), the not-applicable error, and the
closed-form Gaussian-mixture problem (one transition against the paper's formula; samples against
the exact posterior)."""
import math

import pytest
import torch
import yaml

import ldm
from guided_diffusion.measurements import get_operator
from guided_diffusion.methods import (CONFIG_DIR, METHODS, MethodNotApplicableError, available_methods, get_method,
                                      method_defaults)
from ldm_compact import COMPACT_LDM_CKPT, compact_ldm_config, single_thread  # noqa: F401 (autouse fixture)
from smc.closed_form import GaussianMixtureLDM, make_toy_problem, sliced_wasserstein
from smc.counting import CountingModel
from smc.schedule import ddim_eta1_coeffs, tweedie_zbar0

BASELINES = ("ldps", "gml_dps", "psld", "resample", "latent_daps")
# Steps on unsquared norms, scaled by sqrt(d_demo / d_ffhq) = 1/8 for the demo model (docs/methods.md).
UNSQUARED_STEPS = {"ldps": ("zeta",), "gml_dps": ("omega", "gamma"), "psld": ("omega", "gamma"),
                   "resample": ("zeta",), "latent_daps": ()}
# Short runs for the compact LDM (random-weight UNet: only mechanics are checked there).
SHORT = {"ldps": dict(num_steps=4), "gml_dps": dict(num_steps=4), "psld": dict(num_steps=4, eta=1.0),
         "resample": dict(num_steps=13, skip=2, pixel_max_iters=5, latent_max_iters=3),
         "latent_daps": dict(anneal_steps=3, mcmc_steps=2),
         "ltds": dict(num_steps=4, num_particles=2, refine_max_iters=2),
         "ld_smc": dict(num_steps=4, num_particles=2, s=500, xhat_max_iters=3, refine_max_iters=2)}


# ----------------------------------------------------------------------------- defaults

def test_every_method_is_registered_with_yaml_defaults_and_their_sources():
    assert set(available_methods()) == set(BASELINES) | {"ld_smc", "ltds"}
    for name in BASELINES:
        path = CONFIG_DIR / f"{name}.yaml"
        raw = yaml.safe_load(path.read_text())
        fields = {f.name: f.default for f in __import__("dataclasses").fields(METHODS[name].config_cls)}
        # The config dataclass mirrors the YAML: the function defaults are the official values too.
        assert raw["defaults"] == {k: fields[k] for k in raw["defaults"]}, name
        assert set(raw["defaults"]) == set(fields), f"{name}: every setting is listed in {path.name}"
        in_defaults = False
        for line in path.read_text().splitlines():
            if not line.startswith(" "):
                in_defaults = line.startswith("defaults:")
            elif in_defaults and ":" in line and not line.strip().startswith("#"):
                assert "#" in line, f"{path.name}: no source comment on {line.strip()!r}"
        for dataset in (None, "mnist-demo"):
            assert get_method(name, dataset=dataset).settings()
        spec = METHODS[name]
        assert spec.paper and spec.code and callable(spec.callbacks)


@pytest.mark.parametrize("name", BASELINES)
def test_demo_values_follow_the_one_scaling_rule(name):
    """mnist-demo: the steps on unsquared norms are the FFHQ ones times sqrt(3*32*32 / (3*256*256)) = 1/8;
    nothing else changes."""
    ffhq, demo = method_defaults(name), method_defaults(name, "mnist-demo")
    factor = math.sqrt(3 * 32 * 32 / (3 * 256 * 256))
    for key in ffhq:
        expected = ffhq[key] * factor if key in UNSQUARED_STEPS[name] else ffhq[key]
        assert demo[key] == pytest.approx(expected), key


# ----------------------------------------------------------------------------- the compact LDM

@pytest.fixture(scope="module")
def model():
    return ldm.load_model(compact_ldm_config(), device="cpu", ckpt=COMPACT_LDM_CKPT)


class CountingWithEncoder(CountingModel):
    """CountingModel that also counts encoder forward / backward calls."""

    def encode(self, x):
        return self._count("encoder", self._model.encode(x), x.shape[0])


def inpainting(B):
    op = get_operator("inpainting", device="cpu")
    mask = torch.ones(B, 1, 64, 64)
    mask[0, :, 16:48, 16:48] = 0                      # a different mask per image
    mask[1:, :, :, 32:] = 0
    return op.set_mask(mask)


def measure(op, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 64, 64, generator=g) * 2 - 1
    return op(x) + 0.01 * torch.randn(op(x).shape, generator=g)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


KEYS = ("unet_fwd", "unet_bwd", "decoder_fwd", "decoder_bwd", "encoder_fwd", "encoder_bwd")


def expected_calls(name, cfg, i, K, t_next):
    """Model calls of transition i (of K, to timestep t_next): the cost table of docs/methods.md."""
    c = dict.fromkeys(KEYS, 0)
    if name == "latent_daps":
        return {**c, "unet_fwd": cfg.ode_steps, "decoder_fwd": cfg.mcmc_steps, "decoder_bwd": cfg.mcmc_steps}
    if name == "ltds":                                # guided forward of z_t': UNet and decoder, fwd + bwd
        return {**c, "unet_fwd": 1, "unet_bwd": 1, "decoder_fwd": 1, "decoder_bwd": 1}
    if name == "ld_smc":                              # + D(z_t') for l(y_t' | z_t'), + D(mu) for g2 when t' <= s
        g2 = int(t_next <= cfg.s)
        return {**c, "unet_fwd": 1, "unet_bwd": 1, "decoder_fwd": 2 + g2, "decoder_bwd": 1 + g2}
    c.update(unet_fwd=1, unet_bwd=1, decoder_fwd=1, decoder_bwd=1)    # grad of ||y - A(D(zbar0(z_t)))||
    if name in ("gml_dps", "psld"):
        c.update(encoder_fwd=1, encoder_bwd=1)                         # the gluing term's E(.)
    if name == "resample":
        index, third = K - 1 - i, K // 3
        if 0 < index <= K - third and index % cfg.skip == 0:
            c["unet_fwd"] += min(cfg.look_ahead, K - 1 - i)            # look-ahead to zhat0
            if index >= third:                                         # D(zhat0), pixel AdamW, E(x_hat)
                c["decoder_fwd"] += 1
                c["encoder_fwd"] += 1
            else:                                                      # latent AdamW
                c["decoder_fwd"] += cfg.latent_max_iters
                c["decoder_bwd"] += cfg.latent_max_iters
    return c


@pytest.mark.parametrize("name", BASELINES + ("ltds", "ld_smc"))
def test_method_on_the_compact_ldm_calls_back_once_per_transition_at_the_stated_cost(model, name):
    B = 2
    op = inpainting(B)
    method = get_method(name, **SHORT[name])
    counted, snaps, states = CountingWithEncoder(model), [], []

    def callback(state):
        snaps.append(counted.snapshot())
        states.append(state)

    res = method(counted, op, measure(op, B), generator=gens(1, 2), callback=callback)
    K = method.num_callbacks(1000)
    assert len(states) == K
    assert res.x0.shape == (B, 3, 64, 64) and torch.isfinite(res.x0).all()
    assert [s.step for s in states] == list(range(K))
    assert all(s.t > s.t_next for s in states) and states[-1].t_next == 0
    lat = (B, 3, 16, 16) if name not in ("ld_smc", "ltds") else (B, 2, 3, 16, 16)   # LD-SMC: per particle
    assert all(s.zbar0.shape == lat for s in states)
    if name in BASELINES:
        assert res.x0_refined is None and res.residual.shape == (B, K)
    else:
        assert res.x0_refined.shape == (B, 3, 64, 64)
    first = 0 if name in BASELINES else 1             # LD-SMC's first callback also holds its start
    for i in range(first, K - (name in ("ld_smc", "ltds"))):   # (and its last transition has no UNet call)
        before = snaps[i - 1] if i > 0 else {}
        got = {k: snaps[i][k] - before.get(k, 0) for k in KEYS}
        assert got == expected_calls(name, method.config, i, K, states[i].t_next), (i, got)
    end = {k: counted.counts[k] - snaps[-1][k] for k in KEYS}
    if name == "resample":                            # final latent optimisation, then D(z_0)
        n = method.config.latent_max_iters
        assert end == {**dict.fromkeys(KEYS, 0), "decoder_fwd": n + 1, "decoder_bwd": n}, end
    elif name in BASELINES:
        assert end == {**dict.fromkeys(KEYS, 0), "decoder_fwd": 1}, end


@pytest.mark.parametrize("name", BASELINES + ("ltds",))
def test_an_image_result_does_not_depend_on_its_batch(model, name):
    op = inpainting(3)
    y = measure(op, 3, seed=4)
    method = get_method(name, **SHORT[name])
    batch = method(model, op, y, generator=gens(7, 8, 9))
    op.set_mask(op.mask[2:])
    alone = method(model, op, y[2:], generator=gens(9))
    scale = batch.x0[2].abs().max()
    assert torch.allclose(batch.x0[2], alone.x0[0], rtol=1e-4, atol=1e-4 * float(scale))


def test_psld_refuses_a_nonlinear_operator_and_resample_runs_on_one(model):
    phase = get_operator("phase_retrieval", oversample=0.0)
    with pytest.raises(MethodNotApplicableError, match="'psld' needs a linear operator.*'phase_retrieval'"):
        get_method("psld").check_applicable(phase)
    with pytest.raises(MethodNotApplicableError, match="psld"):   # before any work is done
        get_method("psld", num_steps=3)(model, phase, torch.zeros(1, 3, 64, 64))
    for name in set(BASELINES) - {"psld"}:
        get_method(name).check_applicable(phase)
    # ReSample's pixel stage is AdamW on ||y - A(x)||^2: A's gradient is enough, no adjoint.
    y = phase(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    res = get_method("resample", **SHORT["resample"])(model, phase, y, generator=gens(3))
    assert torch.isfinite(res.x0).all()


# ----------------------------------------------------------------------------- the closed-form problem

class SkewEncoderLDM(GaussianMixtureLDM):
    """The closed-form model with E = M W^+ (M != I), so that E(D(z)) != z and the gluing terms act."""

    def encode(self, x):
        M = torch.eye(self.W.shape[1], dtype=torch.float64) + 0.3 * torch.ones(self.W.shape[1], self.W.shape[1])
        return super().encode(x) @ M.T


def skew_problem():
    base, op, y0, _ = make_toy_problem(sigma_y=0.3)
    model = SkewEncoderLDM(base.means, base.variances, base.log_pi.exp(), base.W)
    return model, op, y0


@pytest.mark.parametrize("name, eta", [("ldps", 1.0), ("ldps", 0.0), ("gml_dps", 0.0), ("gml_dps", 1.0),
                                       ("psld", 0.0), ("psld", 1.0), ("resample", 0.0)])
def test_one_transition_is_the_papers_update(name, eta):
    """T-1 -> 0 in one transition, recomputed here from the papers' formulas with the exact eps:
    z_0 = sqrt(abar_0) zbar0 + c eps + sigma n - step * grad_{z_T} loss."""
    model, op, y0 = skew_problem()
    y = torch.cat([y0, 0.5 * y0])
    steps = dict(ldps=dict(zeta=0.2), gml_dps=dict(omega=0.2, gamma=0.3), psld=dict(omega=0.2, gamma=0.3),
                 resample=dict(zeta=0.2, final_optimisation=False))[name]
    res = get_method(name, num_steps=2, eta=eta, **steps)(model, op, y, generator=gens(11, 12))

    abar = model.alphas_cumprod
    g = gens(11, 12)
    z_T = torch.stack([torch.randn(4, generator=gi, dtype=torch.float64) for gi in g]).requires_grad_(True)
    eps = model.eps(z_T, torch.full((2,), 999))
    zbar0 = tweedie_zbar0(z_T, eps, abar[999])
    x0 = zbar0 @ model.W.T
    norm = lambda v: v.norm(dim=1)                                     # noqa: E731
    loss = norm(y - op(x0))
    if name == "gml_dps":
        loss = 0.2 * loss + 0.3 * norm(zbar0 - model.encode(x0))
    elif name == "psld":
        glued = op.transpose(y) + x0 - op.transpose(op(x0))
        loss = 0.2 * loss + 0.3 * norm(zbar0 - model.encode(glued))
    step = dict(ldps=0.2, gml_dps=1.0, psld=1.0, resample=0.2 * abar[999])[name]
    grad, = torch.autograd.grad(loss.sum(), z_T)
    sigma1, _ = ddim_eta1_coeffs(abar[999], abar[0])
    sigma = eta * sigma1
    z0 = abar[0].sqrt() * zbar0 + (1 - abar[0] - sigma ** 2).sqrt() * eps - step * grad
    if eta > 0:
        z0 = z0 + sigma * torch.stack([torch.randn(4, generator=gi, dtype=torch.float64) for gi in g])
    assert torch.allclose(res.z0, z0.detach(), atol=1e-10)
    assert torch.allclose(res.residual[:, 0], norm(y - op(x0)).detach())


POSTERIOR_RUNS = {          # settings for the 4-dim toy (the FFHQ step sizes are for 12288-dim latents)
    "ldps": dict(num_steps=100, zeta=0.1),
    "gml_dps": dict(num_steps=100, eta=1.0, omega=0.1, gamma=0.1),
    "psld": dict(num_steps=100, eta=1.0, omega=0.1, gamma=0.1),
    # ||A(D(z)) - y||^2 / tau^2 is the log-likelihood of noise with variance tau^2 / 2
    "latent_daps": dict(tau=0.3 * math.sqrt(2), lr=3e-2, mcmc_steps=10, anneal_steps=20),
}


@pytest.fixture(scope="module")
def toy():
    model, op, y0, _ = make_toy_problem(sigma_y=0.3)
    g = torch.Generator().manual_seed(5)
    n = 400
    post, prior = model.sample_posterior(op.A, y0, 0.3, n, g), model.sample_prior(n, g)
    sw = lambda a: sliced_wasserstein(a, post, 200, torch.Generator().manual_seed(0))   # noqa: E731
    residual = lambda z: float((y0 - op(model.decode(z))).norm(dim=1).mean())           # noqa: E731
    return dict(model=model, op=op, y=y0.expand(n, -1), n=n, sw=sw, residual=residual, prior=prior, post=post)


@pytest.mark.parametrize("name", sorted(POSTERIOR_RUNS))
def test_guidance_moves_samples_to_the_posterior(toy, name):
    """n runs on the same y (one generator each) against exact posterior draws: the sliced Wasserstein
    distance falls well below the prior's (it rises above it with the guidance's sign flipped, or with a
    step 3x too large for LDPS) and the measurement residual falls below the prior's."""
    res = get_method(name, **POSTERIOR_RUNS[name])(toy["model"], toy["op"], toy["y"],
                                                    generator=torch.Generator().manual_seed(0))
    sw_prior, sw = toy["sw"](toy["prior"]), toy["sw"](res.z0)
    assert sw < 0.6 * sw_prior, (sw, sw_prior)
    assert toy["residual"](res.z0) < toy["residual"](toy["prior"])


def test_unguided_chains_sample_the_prior(toy):
    """Guidance off: the DDPM chain and LatentDAPS's annealing (ODE + prior-only MCMC) draw the prior."""
    sw_prior = lambda z: sliced_wasserstein(z, toy["prior"], 200, torch.Generator().manual_seed(0))   # noqa: E731
    gap = toy["sw"](toy["prior"])                     # prior to posterior: the distance to resolve
    for name, over in (("ldps", dict(num_steps=100, zeta=0.0)),
                       ("latent_daps", dict(tau=1e6, mcmc="langevin", lr=3e-2, mcmc_steps=10, anneal_steps=20))):
        res = get_method(name, **over)(toy["model"], toy["op"], toy["y"], generator=torch.Generator().manual_seed(1))
        assert sw_prior(res.z0) < 0.6 * gap, name


def test_resample_enforces_the_measurement(toy):
    """Hard data consistency: ReSample's samples fit y far better than prior draws (and than the posterior,
    which keeps the noise: ReSample is not a posterior sampler for noisy y)."""
    y, short = toy["y"][:100], dict(num_steps=100, pixel_max_iters=400, latent_max_iters=200)
    res = get_method("resample", **short)(toy["model"], toy["op"], y, generator=torch.Generator().manual_seed(2))
    assert toy["residual"](res.z0) < 0.05 * toy["residual"](toy["prior"])
    mid = get_method("resample", final_optimisation=False, **short)(
        toy["model"], toy["op"], y, generator=torch.Generator().manual_seed(2))
    assert toy["residual"](mid.z0) < 0.5 * toy["residual"](toy["prior"])

"""LD-SMC on the closed-form Gaussian-mixture model: config, shapes, seeds, batching,
Gibbs paths, refinement, call counts and convergence of latent TDS (exact preset)."""
import math

import pytest
import torch

from ldm_compact import single_thread  # noqa: F401 (autouse: one thread is faster for tiny tensors)
from smc import LDSMCConfig, NonFiniteWeightsError, ld_smc_sample, make_chain, num_transitions, strided_timesteps
from smc.auxiliary import selected_path
from smc.closed_form import make_toy_problem, sliced_wasserstein
from smc.counting import CountingModel

SIGMA_Y = 0.3


@pytest.fixture(scope="module")
def toy():
    return make_toy_problem(sigma_y=SIGMA_Y)


def small_cfg(**kw):
    base = dict(num_particles=4, num_steps=20, kappa1=0.05, kappa2=0.1, s=8, sigma_y=SIGMA_Y,
                refine=False, xhat_max_iters=50, refine_max_iters=50, refine_patience=10)
    base.update(kw)
    return LDSMCConfig(**base)


@pytest.mark.parametrize("kw, msg", [
    (dict(preset="approximate"), "unknown preset"),
    (dict(resampling="stratified"), "unknown resampling"),
    (dict(select="best"), "unknown select"),
    (dict(kappa1=-1.0), "kappa1 must be >= 0"),
    (dict(kappa1=float("inf")), "kappa1 must be a finite number, got inf"),
    (dict(kappa1="abc"), "kappa1 must be a finite number, got 'abc'"),
    (dict(kappa2=float("nan")), "kappa2 must be a finite number, got nan"),
    (dict(rho="0.5"), "rho must be a finite number, got '0.5'"),
    (dict(rho=1.5), "rho must lie"),
    (dict(sigma_y=0.0), "sigma_y must be > 0"),
    (dict(sigma_y=float("inf")), "sigma_y must be a finite number"),
    (dict(refine_lr=True), "refine_lr must be a finite number, got True"),
    (dict(s=-1), "s must be an int >= 0"),
    (dict(s=33.3), "s must be an int, got 33.3"),
    (dict(num_steps=20.0), "num_steps must be an int"),
    (dict(start_at_T="no"), "start_at_T must be True, False"),
    (dict(refine_return="first"), "refine_return must be"),
    (dict(num_steps=1), "num_steps must be"),
    (dict(num_steps=1001), "num_steps must be"),
    (dict(ess_threshold=0.0), "ess_threshold"),
    (dict(log_density="median"), "unknown log_density"),
    (dict(num_particles=0), "num_particles"),
    (dict(num_gibbs_iters=2, aux_observations=False), "needs aux_observations"),
    (dict(noisy_aux_obs="yes"), "noisy_aux_obs must be"),
    (dict(aux_device="gpu0"), "aux_device must be"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LDSMCConfig(**kw).resolve()


def test_presets_fill_only_unset_switches():
    ref = LDSMCConfig(preset="reference").resolve()
    ex = LDSMCConfig(preset="exact").resolve()
    assert (ref.log_density, ref.noisy_aux_obs, ref.ess_threshold) == ("mean", False, None)
    assert (ex.log_density, ex.noisy_aux_obs, ex.final_std_sigma_y, ex.twist_var_sigma_y,
            ex.ess_threshold) == ("sum", True, True, True, 0.5)
    release = ("start_at_T", "aux_one_step_below", "log_prior_new_moments", "refine_each_gibbs")
    assert all(getattr(ref, k) is True for k in release) and ref.refine_return == "last"
    assert all(getattr(ex, k) is False for k in release) and ex.refine_return == "best"
    mixed = LDSMCConfig(preset="exact", log_density="mean", ess_threshold=None).resolve()
    assert (mixed.log_density, mixed.ess_threshold, mixed.noisy_aux_obs) == ("mean", None, True)


def test_strided_timesteps():
    full = strided_timesteps(1000)
    assert torch.equal(full, torch.arange(999, -1, -1))
    ts = strided_timesteps(20)
    assert ts[0] == 999 and ts[-1] == 0 and ts.numel() == 20 and bool((ts[:-1] > ts[1:]).all())


@pytest.mark.parametrize("preset", ["reference", "exact"])
@pytest.mark.parametrize("select", ["max_weight", "sample", "all"])
def test_shapes_and_normalised_weights(toy, preset, select):
    model, op, y0, _ = toy
    B, N = 3, 4
    cfg = small_cfg(preset=preset, select=select, refine=True)
    res = ld_smc_sample(model, op, y0.expand(B, -1), cfg, generator=torch.Generator().manual_seed(0))
    K = num_transitions(cfg)
    assert K == cfg.num_steps - 1 + (preset == "reference")   # the release's extra first level
    lead = (B, N) if select == "all" else (B,)
    assert res.x0.shape == (*lead, 4) and res.z0.shape == (*lead, 4)
    assert res.x0_refined.shape == res.x0.shape
    assert res.x0_per_gibbs.shape == (1, *lead, 4)
    if preset == "reference":
        assert torch.equal(res.x0_refined_per_gibbs[-1], res.x0_refined)
    else:
        assert res.x0_refined_per_gibbs is None
    assert res.timesteps.numel() == K + 1
    assert res.particles_z0.shape == (B, N, 4) and res.log_weights.shape == (B, N)
    assert torch.allclose(torch.logsumexp(res.log_weights, 1), torch.zeros(B, dtype=res.log_weights.dtype))
    assert res.ess.shape == (B, K) and bool(((res.ess >= 1 - 1e-9) & (res.ess <= N + 1e-9)).all())
    assert res.ancestors.shape == (K, B, N) and int(res.ancestors.max()) < N
    assert res.preset == preset and res.config.preset == preset and res.config.log_density != "preset"
    assert torch.isfinite(res.x0).all() and torch.isfinite(res.x0_refined).all()
    if select == "max_weight":
        assert torch.equal(res.selected, res.log_weights.argmax(1))
        assert torch.equal(res.z0, res.particles_z0[torch.arange(B), res.selected])


def test_reference_resamples_every_step_but_first(toy):
    model, op, y0, _ = toy
    seen = []
    ld_smc_sample(model, op, y0, small_cfg(), generator=torch.Generator().manual_seed(0),
                  callback=lambda s: seen.append((s.step, s.t, s.t_next, bool(s.resampled[0]))))
    ts = [1000] + strided_timesteps(20).tolist()     # start_at_T: first level at t = T
    assert [s[:3] for s in seen] == [(i, ts[i], ts[i + 1]) for i in range(20)]
    assert [s[3] for s in seen] == [False] + [True] * 19


def test_same_seed_same_output_and_batch_independence(toy):
    model, op, y0, _ = toy
    cfg = small_cfg(preset="exact", select="sample", refine=True, num_gibbs_iters=2)
    ys = torch.cat([y0, y0 + 0.5, y0 - 0.7])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    a = ld_smc_sample(model, op, ys, cfg, generator=gens())
    b = ld_smc_sample(model, op, ys, cfg, generator=gens())
    assert torch.equal(a.x0, b.x0) and torch.equal(a.x0_refined, b.x0_refined)
    alone = ld_smc_sample(model, op, ys[1:2], cfg, generator=[torch.Generator().manual_seed(12)])
    pair = ld_smc_sample(model, op, ys[1:], cfg, generator=gens()[1:])
    for other in (alone, pair):
        assert torch.allclose(other.x0[0], a.x0[1], atol=1e-10)
        assert torch.allclose(other.x0_refined[0], a.x0_refined[1], atol=1e-10)
        assert torch.equal(other.ancestors[:, 0], a.ancestors[:, 1])
    c = ld_smc_sample(model, op, ys, cfg, generator=torch.Generator().manual_seed(99))
    assert not torch.allclose(c.x0, a.x0)


def test_selected_path_walks_ancestors_back():
    # 2 transitions, B = 1, N = 3; states carry their own (level, particle) labels.
    states = torch.tensor([[[0., 1., 2.]], [[10., 11., 12.]], [[20., 21., 22.]]])
    ancestors = torch.tensor([[[2, 2, 0]], [[1, 0, 0]]])
    path = selected_path(states, ancestors, torch.tensor([0]))
    # level 2 particle 0 <- level 1 particle 1 <- level 0 particle 2
    assert path.flatten().tolist() == [2.0, 11.0, 20.0]


def test_gibbs_iterations_and_refinement_lowers_misfit(toy):
    model, op, y0, _ = toy
    cfg = small_cfg(num_gibbs_iters=3, refine=True, refine_max_iters=300, refine_patience=50)
    res = ld_smc_sample(model, op, y0.expand(2, -1), cfg, generator=torch.Generator().manual_seed(1))
    assert res.x0_per_gibbs.shape == (3, 2, 4)
    assert torch.equal(res.x0_per_gibbs[-1], res.x0)
    assert not torch.allclose(res.x0_per_gibbs[0], res.x0_per_gibbs[1])
    misfit = lambda x: (y0 - op(x)).pow(2).sum(1)
    assert bool((misfit(res.x0_refined) < misfit(res.x0)).all())


def test_cond_reaches_every_eps_call(toy):
    model, op, y0, _ = toy
    seen = []

    class Spy(CountingModel):
        def eps(self, z, t, cond=None):
            seen.append(cond.clone())
            return super().eps(z, t, cond)

    cond = torch.tensor([3, 7])
    ld_smc_sample(Spy(model), op, y0.expand(2, -1), small_cfg(num_particles=3), cond=cond,
                  generator=torch.Generator().manual_seed(0))
    # one eps call per level: t = T, ts[0..K-1] with gradient, t = 0 for the release's log prior
    assert len(seen) == num_transitions(small_cfg()) + 1
    assert all(torch.equal(c, torch.tensor([3, 3, 3, 7, 7, 7])) for c in seen)
    with pytest.raises(ValueError, match="one per image"):
        ld_smc_sample(model, op, y0.expand(2, -1), small_cfg(), cond=torch.tensor([1]))


@pytest.mark.parametrize("aux", [True, False])
def test_call_counts_per_transition(toy, aux):
    model, op, y0, _ = toy
    counted = CountingModel(model)
    cfg = small_cfg(aux_observations=aux, num_steps=30, s=400)
    snaps = []
    ld_smc_sample(counted, op, y0, cfg, generator=torch.Generator().manual_seed(0),
                  callback=lambda st: snaps.append((st.t_next, counted.snapshot())))
    for (_, before), (t_next, after) in zip(snaps[:-2], snaps[1:-1]):   # transitions with t' > 0
        d = {k: after[k] - before[k] for k in ("unet_fwd", "unet_bwd", "decoder_fwd", "decoder_bwd")}
        g2 = int(aux and t_next <= cfg.s)
        assert d["unet_fwd"] == 1 and d["unet_bwd"] == 1, d
        # D(zbar0) for g1 and lbar, D(z_t) for l(y_t | z_t) (aux only), D(mu) for g2
        assert d["decoder_fwd"] == 1 + int(aux) + g2, d
        assert d["decoder_bwd"] == 1 + g2, d
    last = {k: snaps[-1][1][k] - snaps[-2][1][k] for k in ("unet_fwd", "decoder_fwd")}
    # z_0: likelihood (+ g2); eps at t = 0 only for the release's log prior (moments at z_0)
    assert last["unet_fwd"] == int(cfg.resolve().log_prior_new_moments)
    assert last["decoder_fwd"] == 1 + int(aux)


def test_latent_tds_exact_converges_to_posterior(toy):
    # Spec section 4: with aux observations off, the exact preset targets p(z0 | y0) as
    # N grows. Many independent runs (B copies of y0), one draw from each run's weights.
    model, op, y0, _ = toy
    B = 256
    g = torch.Generator().manual_seed(7)
    exact = lambda: model.sample_posterior(op.A, y0, SIGMA_Y, B, g)
    ref = exact()
    baseline = sum(sliced_wasserstein(exact(), ref, 500, g) for _ in range(3)) / 3
    dist = {}
    for N in (1, 64):
        cfg = LDSMCConfig(num_particles=N, preset="exact", aux_observations=False, num_steps=50,
                          kappa1=0.02, sigma_y=SIGMA_Y, select="sample", refine=False)
        res = ld_smc_sample(model, op, y0.expand(B, -1), cfg, generator=torch.Generator().manual_seed(1))
        dist[N] = sliced_wasserstein(res.z0, ref, 500, g)
    assert dist[64] < 0.6 * dist[1], dist
    assert dist[64] < 1.35 * baseline, (dist, baseline)


def test_latent_tds_moments_with_strong_guidance(toy):
    # With kappa1 = 0.3 the proposal is far from the prior transition, so the weights'
    # log p - log pi correction matters (without it the spread drops ~10 %); the exact
    # preset must still match the posterior mean and spread. (The 50-step chain itself
    # under-disperses by a few %.)
    model, op, y0, _ = toy
    B = 2048
    exact = model.sample_posterior(op.A, y0, SIGMA_Y, 400000, torch.Generator().manual_seed(1))
    cfg = LDSMCConfig(num_particles=16, preset="exact", aux_observations=False, num_steps=50,
                      kappa1=0.3, sigma_y=SIGMA_Y, select="sample", refine=False)
    z = ld_smc_sample(model, op, y0.expand(B, -1), cfg, generator=torch.Generator().manual_seed(3)).z0
    se = exact.std(0) / math.sqrt(B)
    assert bool(((z.mean(0) - exact.mean(0)).abs() < 3 * se).all()), (z.mean(0), exact.mean(0))
    ratio = z.std(0) / exact.std(0)
    assert bool(((ratio > 0.92) & (ratio < 1.05)).all()), ratio


def test_aux_device_keeps_results(toy):
    """Keeping y_t on another device (here: "cpu" named explicitly) changes nothing."""
    model, op, y0, _ = toy
    y = y0.expand(2, *y0.shape[1:])
    runs = [ld_smc_sample(model, op, y, small_cfg(preset="exact", num_gibbs_iters=2, aux_device=dev),
                          generator=torch.Generator().manual_seed(3)) for dev in (None, "cpu")]
    assert torch.equal(runs[0].x0, runs[1].x0) and torch.equal(runs[0].log_weights, runs[1].log_weights)


def test_chain_levels_with_and_without_the_release_indexing():
    ours = make_chain(4, 1000, start_at_T=False, aux_one_step_below=False)
    assert ours.t == ours.a == [999, 666, 333, 0] and ours.a_next == [666, 333, 0]
    assert ours.path_a == [999, 666, 333] and ours.aux == [0, 1, 2]
    release = make_chain(4, 1000, start_at_T=True, aux_one_step_below=True)
    # first level at t = T with abar_999, one model step down; then the schedule
    assert release.t == [1000, 999, 666, 333, 0] and release.a == [999, 999, 666, 333, 0]
    assert release.a_next == [998, 666, 333, 0]
    # every level after the first meets the heuristic latent one model step below its own abar
    assert release.path_a == [999, 998, 665, 332] and release.aux == [0, 1, 2, 3]
    by_level = make_chain(4, 1000, start_at_T=True, aux_one_step_below=False)
    assert by_level.path_a == [999, 666, 333] and by_level.aux == [0, 0, 1, 2]
    # on the full chain the release's steps are the schedule's own
    full = make_chain(1000, 1000, start_at_T=True, aux_one_step_below=True)
    assert full.path_a == list(range(999, -1, -1)) and full.a_next[0] == 998 and full.a_next[1] == 998
    abar = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    sqrt_next, c_eps, sigma = full.step_coeffs(abar)
    prior_next, prior_c, prior_sigma = full.prior_coeffs(abar)
    assert sqrt_next[0] == sqrt_next[1] == abar[998].sqrt() and sigma[0] == sigma[1]
    assert sigma[1:] == prior_sigma[1:-1] and sqrt_next[1:] == prior_next[1:-1]
    # t = 0: mean zbar0 (to abar = 1), sigma of abar_1 -> abar_0 (the proposal's, on the full chain)
    assert prior_next[-1] == 1 and prior_c[-1] == 0 and prior_sigma[-1] == sigma[-1]


class Trace:
    def __init__(self):
        self.events = []

    def __call__(self, event, **values):
        self.events.append((event, values))

    def of(self, event):
        return [v for e, v in self.events if e == event]


def test_start_at_T_calls_the_model_at_T_first(toy):
    model, op, y0, _ = toy
    ts = []

    class Spy(CountingModel):
        def eps(self, z, t, cond=None):
            ts.append(int(t[0]))
            return super().eps(z, t, cond)

    for start in (True, False):
        ts.clear()
        ld_smc_sample(Spy(model), op, y0, small_cfg(start_at_T=start), generator=torch.Generator().manual_seed(0))
        assert ts[:2] == ([1000, 999] if start else [999, strided_timesteps(20)[1]])


@pytest.mark.parametrize("one_step_below", [True, False])
def test_aux_pairing(toy, one_step_below):
    model, op, y0, _ = toy
    tr = Trace()
    cfg = small_cfg(aux_one_step_below=one_step_below)
    ld_smc_sample(model, op, y0, cfg, generator=torch.Generator().manual_seed(0), trace=tr)
    (aux,) = tr.of("aux_observations")
    path, ys = aux["path"], aux["ys"]
    chain = make_chain(20, 1000, True, one_step_below)
    assert path.shape[0] == len(chain.path_a) and ys.shape[0] == chain.num_levels - 1
    decoded = op(model.decode(path.flatten(0, 1))).view(path.shape[0], 1, -1)
    assert torch.allclose(ys, decoded[chain.aux])
    own = [chain.path_a[k] for k in chain.aux]
    if one_step_below:   # level 0 its own abar, later levels one model step below theirs
        assert own == [chain.a[0]] + [a - 1 for a in chain.a[1:-1]]
    else:                # levels 0 and 1 (both abar_999) share path level 0
        assert own == chain.a[:-1] and chain.aux[:2] == [0, 0]


@pytest.mark.parametrize("new_moments", [True, False])
def test_log_prior_switch(toy, new_moments):
    # Without guidance the proposal is the prior transition: the spec's log p(z_t | z_t+1)
    # then equals log pi exactly; the release's moments at the new z_t do not.
    model, op, y0, _ = toy
    tr = Trace()
    cfg = small_cfg(kappa1=0.0, kappa2=0.0, log_prior_new_moments=new_moments)
    ld_smc_sample(model, op, y0, cfg, generator=torch.Generator().manual_seed(0), trace=tr)
    steps = tr.of("transition")
    same = [torch.equal(s["log_prior"], s["log_pi"]) for s in steps]
    assert not any(same) if new_moments else all(same)
    if new_moments:   # one-model-step kernels; at t = 0 mean zbar0(z_0), sigma of abar_1 -> abar_0
        abar = model.alphas_cumprod
        sigma_10 = ((1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])).sqrt()
        assert torch.allclose(steps[-1]["sigma_prior"], sigma_10) and steps[-1]["sigma"] > sigma_10


@pytest.mark.parametrize("each", [True, False])
def test_refine_each_gibbs(toy, each):
    model, op, y0, _ = toy
    res = ld_smc_sample(model, op, y0.expand(2, -1), small_cfg(num_gibbs_iters=2, refine=True, refine_each_gibbs=each),
                        generator=torch.Generator().manual_seed(0))
    if each:
        assert res.x0_refined_per_gibbs.shape == (2, 2, 4)
        assert torch.equal(res.x0_refined_per_gibbs[-1], res.x0_refined)
    else:
        assert res.x0_refined_per_gibbs is None and res.x0_refined.shape == (2, 4)


class NaNAt:
    """The closed-form model whose eps is NaN for image `row` (N particles each) at timestep t_bad."""

    def __init__(self, model, row, N, t_bad):
        self._model, self.row, self.N, self.t_bad = model, row, N, t_bad

    def __getattr__(self, name):
        return getattr(self._model, name)

    def eps(self, z, t, cond=None):
        e = self._model.eps(z, t, cond)
        if int(t[0]) == self.t_bad:
            bad = torch.zeros(z.shape[0], 1, dtype=torch.bool)
            bad[self.row * self.N:(self.row + 1) * self.N] = True
            e = torch.where(bad, torch.full_like(e, float("nan")), e)
        return e


@pytest.mark.parametrize("N", [1, 4])
def test_non_finite_model_output_is_named(toy, N):
    model, op, y0, _ = toy
    ts = [1000] + strided_timesteps(20).tolist()
    cfg = small_cfg(num_particles=N)
    with pytest.raises(NonFiniteWeightsError) as info:
        ld_smc_sample(NaNAt(model, 1, N, ts[5]), op, y0.expand(3, -1), cfg, generator=torch.Generator().manual_seed(0))
    err = info.value
    assert isinstance(err, RuntimeError) and (err.image, err.step, err.t) == (1, 4, ts[5])
    assert "image row 1" in str(err) and "transition 4" in str(err) and f"t = {ts[5]}" in str(err)
    assert "corrupted checkpoint" in str(err) and "operator" in str(err)


def test_non_finite_measurement_stops_at_the_start(toy):
    model, op, y0, _ = toy
    y = y0.expand(2, -1).clone()
    y[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="image row 0 at the start") as info:
        ld_smc_sample(model, op, y, small_cfg(aux_observations=False), generator=torch.Generator().manual_seed(0))
    assert info.value.step is None and info.value.t == 1000

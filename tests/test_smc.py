"""LD-SMC on the closed-form Gaussian-mixture model: config, shapes, seeds, batching,
Gibbs paths, refinement, call counts and convergence of latent TDS (exact preset)."""
import math

import pytest
import torch

from ldm_compact import single_thread  # noqa: F401 (autouse: one thread is faster for tiny tensors)
from smc import LDSMCConfig, ld_smc_sample, strided_timesteps
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
    (dict(kappa1=-1.0), "kappa1 and kappa2"),
    (dict(rho=1.5), "rho must lie"),
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
    K = cfg.num_steps - 1
    lead = (B, N) if select == "all" else (B,)
    assert res.x0.shape == (*lead, 4) and res.z0.shape == (*lead, 4)
    assert res.x0_refined.shape == res.x0.shape
    assert res.x0_per_gibbs.shape == (1, *lead, 4)
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
    ts = strided_timesteps(20).tolist()
    assert [s[:3] for s in seen] == [(i, ts[i], ts[i + 1]) for i in range(19)]
    assert [s[3] for s in seen] == [False] + [True] * 18


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
    assert len(seen) == 19 and all(torch.equal(c, torch.tensor([3, 3, 3, 7, 7, 7])) for c in seen)
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
    assert last["unet_fwd"] == 0 and last["decoder_fwd"] == 1 + int(aux)   # z_0: likelihood (+ g2)


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

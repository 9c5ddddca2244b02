"""LD-SMC end to end on the small fixture LDM (64x64 images, 3x16x16 latents) with the
project's inpainting and super-resolution operators, on a short schedule."""
import pytest
import torch

import ldm
from guided_diffusion import measurements
from ldm_compact import COMPACT_LDM_CKPT, single_thread, compact_ldm_config  # noqa: F401 (autouse fixture)
from smc import LDSMCConfig, NonFiniteWeightsError, ld_smc_sample, num_transitions
from smc.counting import CountingModel

pytestmark = pytest.mark.slow   # a few seconds per transition on a busy 2-core CPU


@pytest.fixture(scope="module")
def model():
    return ldm.load_model(compact_ldm_config(), device="cpu", ckpt=COMPACT_LDM_CKPT)


def make_operator(name, B):
    if name == "inpainting":
        op = measurements.get_operator("inpainting", device="cpu")
        mask = torch.ones(B, 1, 64, 64)
        mask[0, :, 16:48, 16:48] = 0           # a different mask per image
        mask[1:, :, :, 32:] = 0
        op.set_mask(mask)
        return op
    return measurements.get_operator("super_resolution", in_shape=(1, 3, 64, 64), scale_factor=4, device="cpu")


@pytest.mark.parametrize("task, gibbs", [("inpainting", 2), ("super_resolution", 1)])
def test_end_to_end_small_ldm(model, task, gibbs):
    B, N = 2, 2
    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(B, 3, 64, 64, generator=g) * 2 - 1
    op = make_operator(task, B)
    y = op(x_true) + 0.01 * torch.randn(op(x_true).shape, generator=g)
    # The quantised decoder is piecewise constant in z: a larger refinement step than the
    # reference's 5e-3 makes a few iterations change codes (kept short for CPU tests).
    # refine_return="best": the reference returns the last iterate, which may be worse.
    cfg = LDSMCConfig(num_particles=N, num_steps=4, s=500, num_gibbs_iters=gibbs, xhat_max_iters=5,
                      refine_lr=0.05, refine_max_iters=8, refine_patience=4, decode_chunk=4,
                      refine_return="best")
    counted = CountingModel(model)
    snaps = []
    res = ld_smc_sample(counted, op, y, cfg, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                        callback=lambda st: snaps.append((st.t_next, counted.snapshot())))
    assert res.x0.shape == (B, 3, 64, 64) and res.x0_refined.shape == (B, 3, 64, 64)
    assert res.z0.shape == (B, 3, 16, 16) and res.particles_z0.shape == (B, N, 3, 16, 16)
    assert res.x0_per_gibbs.shape == (gibbs, B, 3, 64, 64)
    assert torch.isfinite(res.x0).all() and torch.isfinite(res.x0_refined).all()
    assert torch.allclose(res.log_weights.logsumexp(1), torch.zeros(B), atol=1e-5)
    assert res.ess.shape == (B, num_transitions(cfg, 1000)) and res.preset == "reference"
    assert res.timesteps.tolist() == [1000, 999, 666, 333, 0]   # the release's first level at t = T
    # Refinement lowers the data misfit ||y - A(x)||^2 (it keeps its best iterate). The
    # random-weight UNet drives z_0 far out (|z| ~ 300), where small moves keep the same
    # codebook entries and the quantised decoder output can stay put: require no increase
    # anywhere and a decrease somewhere (the closed-form test: strict decrease everywhere).
    misfit = lambda x: (y - op(x)).pow(2).flatten(1).sum(1)
    before, after = misfit(res.x0), misfit(res.x0_refined)
    assert bool((after <= before).all()) and bool((after < before).any()), (after, before)
    # One UNet forward+backward per transition (t' > 0), decoder: D(zbar0), D(z_t), D(mu) (t' <= s).
    i = next(i for i in range(1, len(snaps)) if 0 < snaps[i][0] <= cfg.s)
    before, after = snaps[i - 1][1], snaps[i][1]
    d = {k: after[k] - before[k] for k in ("unet_fwd", "unet_bwd", "decoder_fwd", "decoder_bwd")}
    assert d == {"unet_fwd": 1, "unet_bwd": 1, "decoder_fwd": 3, "decoder_bwd": 2}, d
    assert after["unet_fwd_rows"] - before["unet_fwd_rows"] == B * N


def test_image_result_independent_of_batch(model):
    op = measurements.get_operator("super_resolution", in_shape=(1, 3, 64, 64), scale_factor=4, device="cpu")
    g = torch.Generator().manual_seed(3)
    y = op(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1)
    cfg = LDSMCConfig(num_particles=2, num_steps=3, preset="exact", xhat_max_iters=3, refine=False)
    both = ld_smc_sample(model, op, y, cfg, generator=[torch.Generator().manual_seed(s) for s in (4, 5)])
    one = ld_smc_sample(model, op, y[1:], cfg, generator=[torch.Generator().manual_seed(5)])
    assert torch.allclose(both.x0[1], one.x0[0], atol=1e-4)
    assert torch.equal(both.ancestors[:, 1], one.ancestors[:, 0])


def test_corrupted_checkpoint_is_named_not_a_multinomial_error(model):
    """A UNet weight turned NaN (as corrupted checkpoint bytes do) stops the run with
    NonFiniteWeightsError naming the image row and the timestep, before any resampling."""
    import copy
    broken = copy.deepcopy(model)
    with torch.no_grad():
        next(broken.unet.parameters()).view(-1)[0] = float("nan")
    op = measurements.get_operator("super_resolution", in_shape=(1, 3, 64, 64), scale_factor=4, device="cpu")
    y = op(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    cfg = LDSMCConfig(num_particles=2, num_steps=3, xhat_max_iters=2, refine=False)
    with pytest.raises(NonFiniteWeightsError, match="image row 0 at the start .*corrupted checkpoint") as info:
        ld_smc_sample(broken, op, y, cfg, generator=torch.Generator().manual_seed(1))
    assert (info.value.image, info.value.step, info.value.t) == (0, None, 1000)

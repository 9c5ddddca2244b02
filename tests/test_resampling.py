"""Resampling schemes are unbiased; ESS limits; per-image generators."""
import math

import pytest
import torch

from ldm_compact import single_thread  # noqa: F401 (autouse: one thread is faster for tiny tensors)
from smc.resampling import SCHEMES, ess, per_image_generators, resample

WEIGHTS = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1], dtype=torch.float64)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_expected_offspring_counts_are_n_w(scheme):
    n, reps = WEIGHTS.numel(), 1500
    log_w = WEIGHTS.log().expand(reps, n)
    gens = per_image_generators(torch.Generator().manual_seed(0), reps, torch.device("cpu"))
    idx = resample(log_w, gens, scheme)
    assert idx.shape == (reps, n) and idx.dtype == torch.long
    counts = torch.nn.functional.one_hot(idx, n).sum(1).double()   # [reps, n] offspring
    mean = counts.mean(0)
    se = counts.std(0) / math.sqrt(reps) + 1e-3
    assert torch.all((mean - n * WEIGHTS).abs() < 4 * se), (scheme, mean, n * WEIGHTS)


@pytest.mark.parametrize("scheme", ["systematic", "residual"])
def test_low_variance_schemes_keep_integer_part(scheme):
    # floor(N w_i) copies are guaranteed for systematic and residual resampling.
    n = WEIGHTS.numel()
    gens = per_image_generators(torch.Generator().manual_seed(1), 200, torch.device("cpu"))
    idx = resample(WEIGHTS.log().expand(200, n), gens, scheme)
    counts = torch.nn.functional.one_hot(idx, n).sum(1)
    assert torch.all(counts >= torch.floor(n * WEIGHTS).long())


def test_multinomial_concentrates_on_single_weight():
    log_w = torch.full((3, 6), -math.inf)
    log_w[:, 2] = 0.0
    for scheme in SCHEMES:
        idx = resample(log_w, per_image_generators(torch.Generator().manual_seed(2), 3, "cpu"), scheme)
        assert torch.all(idx == 2), scheme


def test_ess_equal_and_degenerate():
    assert torch.allclose(ess(torch.zeros(2, 7)), torch.full((2,), 7.0))
    assert torch.allclose(ess(torch.full((2, 7), 3.3)), torch.full((2,), 7.0))
    one = torch.full((1, 7), -math.inf)
    one[0, 4] = -12.0
    assert torch.allclose(ess(one), torch.ones(1))
    mid = ess(torch.tensor([[0.0, math.log(3.0)]]))   # w = (1/4, 3/4): 1 / (1/16 + 9/16)
    assert torch.allclose(mid, torch.tensor([1.6]))


def test_unknown_scheme_and_generator_count_errors():
    with pytest.raises(ValueError, match="unknown resampling"):
        resample(torch.zeros(1, 3), [torch.Generator()], "stratified-ish")
    with pytest.raises(ValueError, match="one per image"):
        per_image_generators([torch.Generator()], 2, "cpu")


def test_child_generators_depend_only_on_parent_and_index():
    a = per_image_generators(torch.Generator().manual_seed(9), 3, "cpu")
    b = per_image_generators(torch.Generator().manual_seed(9), 5, "cpu")
    for ga, gb in zip(a, b):
        assert torch.equal(torch.randn(4, generator=ga), torch.randn(4, generator=gb))
    assert not torch.equal(torch.randn(4, generator=a[0]), torch.randn(4, generator=a[1]))


def test_per_image_generators_on_another_device_are_refused_clearly():
    from smc.resampling import per_image_generators

    gens = [torch.Generator(device="cpu") for _ in range(2)]
    assert per_image_generators(gens, 2, torch.device("cpu")) == gens
    with pytest.raises(ValueError, match="generator 0 is on cpu but the model runs on meta"):
        per_image_generators(gens, 2, torch.device("meta"))

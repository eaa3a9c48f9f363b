import math

import pytest
import torch

from diffusers_stages.schedulers import (
    FDM_SIGMA_RANGES,
    FDMDDIMScheduler,
    FDMEDMScheduler,
    fdm_calibrated_sigma_max,
    fdm_scale,
)

from .reference import s_reference


@pytest.mark.parametrize("variant", ["vp", "ve", "edm"])
@pytest.mark.parametrize("m", [0.5, 1.0, 2.0])
def test_scale_matches_reference(variant, m):
    lo, hi = FDM_SIGMA_RANGES[variant]
    sigmas = [0.0, lo, 0.01, 0.5, 1.0, 3.0, 10.0, 40.0, 80.0, hi, 2 * hi]
    got = fdm_scale(torch.tensor(sigmas, dtype=torch.float64), m=m, sigma_min=lo, sigma_max=hi)
    want = torch.tensor([s_reference(s, m, lo, hi) for s in sigmas], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got[0] == 1 and got[1] == 1  # tau clamped at 0
    assert got[-1] == got[-2]  # tau clamped at 1
    assert bool((got[1:].diff() <= 0).all())  # decreasing


def test_published_values_and_m_is_respected():
    # METHODS.md: s(80) = 0.024 for VP-FDM with m = 2
    assert fdm_scale(80.0, m=2.0, sigma_min=0.001, sigma_max=152.17).item() == pytest.approx(0.0243, abs=2e-4)
    # VE: m changes the kernel (the authors' code ignored it)
    ve = dict(sigma_min=0.02, sigma_max=100.0)
    assert fdm_scale(20.0, m=1.0, **ve).item() > fdm_scale(20.0, m=2.0, **ve).item() + 0.05
    assert fdm_scale(torch.tensor(3.0)).dtype == torch.float32 and fdm_scale(3).dtype == torch.float32


def test_kernel_mean_std_and_baseline_snr():
    """x = s (x0 + sigma eps): mean s x0, std s sigma; the SNR is the DDPM baseline's at every t."""
    fdm, base = FDMDDIMScheduler(), FDMDDIMScheduler(input_scaling="baseline")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.7, -0.3])
    for t in [0, 100, 400, 700, 999]:
        eps = torch.randn(40_000, 2, generator=gen, dtype=torch.float64)
        y = fdm.add_noise(x0.double().expand_as(eps), eps, t)
        sigma = math.sqrt((1 - fdm.alphas_cumprod.double()[t]) / fdm.alphas_cumprod.double()[t])
        s = s_reference(sigma, 2.0, fdm.process.sigma_min, fdm.process.sigma_max)
        torch.testing.assert_close(y.mean(0), s * x0.double(), atol=5 * s * sigma / 200, rtol=0)
        torch.testing.assert_close(y.std(0), torch.full((2,), s * sigma, dtype=torch.float64), rtol=0.02, atol=0)
        # same noise, baseline input: the two differ by one factor k_t, so the SNR (x0 coefficient / noise) is equal
        y_base = base.add_noise(x0.double().expand_as(eps), eps, t)
        ratio = y / y_base
        torch.testing.assert_close(ratio, torch.full_like(ratio, s * math.sqrt(1 + sigma**2)), rtol=1e-6, atol=0)


def test_edm_c_in_is_the_kernel():
    """The sigma-space scheduler's network input is c_in x with c_in = s(sigma): mean s x0 and std s sigma."""
    for variant in ["vp", "ve", "edm"]:
        sched = FDMEDMScheduler(variant=variant, m=1.5)
        lo, hi = FDM_SIGMA_RANGES[variant]
        for sigma in [0.002, 0.3, 2.0, 20.0, 80.0]:
            assert sched.c_in(sigma).item() == pytest.approx(s_reference(sigma, 1.5, lo, hi), rel=1e-6)
    x0, eps = torch.full((100_000, 1), 0.4), torch.randn(100_000, 1, generator=torch.Generator().manual_seed(1))
    sched, sigma = FDMEDMScheduler(), 5.0
    y = sched.precondition_inputs(sched.add_noise(x0, eps, sigmas=sigma), sigma)
    s = s_reference(sigma, 2.0, 0.002, 80.0)
    assert y.mean().item() == pytest.approx(s * 0.4, abs=4 * s * sigma / 300)
    assert y.std().item() == pytest.approx(s * sigma, rel=0.01)


@pytest.mark.parametrize("sigma_top", [14.6146, 157.4, 80.0])
def test_calibrated_sigma_max_gives_unit_input_at_the_top(sigma_top):
    sigma_max = fdm_calibrated_sigma_max(sigma_top, sigma_min=0.01)
    k = s_reference(sigma_top, 2.0, 0.01, sigma_max) * math.sqrt(1 + sigma_top**2)
    assert k == pytest.approx(1.0, rel=1e-9) and sigma_max > sigma_top
    assert FDMDDIMScheduler().init_noise_sigma == pytest.approx(1.0, rel=1e-9)
    # the naive choice (tau = 1 at the top) makes the input vanish there
    naive = FDMDDIMScheduler(sigma_max=float(FDMDDIMScheduler().process.sigmas[-1]))
    assert naive.init_noise_sigma < 1e-4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m=0.0), "`m`"),
        (dict(m=-1.0), "`m`"),
        (dict(sigma_min=80.0, sigma_max=80.0), "`sigma_min`"),
        (dict(sigma_min=10.0, sigma_max=1.0), "`sigma_min`"),
        (dict(sigma_min=-1.0), "`sigma_min`"),
        (dict(beta_min=0.0, beta_d=0.0), "`beta_min`"),
    ],
)
def test_kernel_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fdm_scale(torch.tensor([1.0]), **kwargs)


def test_calibration_impossible_raises():
    with pytest.raises(ValueError, match="increase `m`"):
        fdm_calibrated_sigma_max(157.0, 0.01, m=0.3)

"""The FDM paper's settings, one flag away: per-variant defaults of `FDMEDMScheduler`, the discrete authors' range."""

import math

import pytest

from diffusers_stages import FDMDDIMScheduler, FDMDPMSolverMultistepScheduler, FDMEDMScheduler


def authors_s(sigma, m, lo, hi, beta_min=0.1, beta_d=19.9):
    """sail-sg/FDM networks.py `s(sigma)` (their VE network drops the multiplier: m = 1)."""
    t = (sigma - lo) / (hi - lo)
    b = beta_min * t + 0.5 * beta_d * t**2
    return math.exp(-m * b) * (1 + m * b)


@pytest.mark.parametrize(
    "variant, sigma_min, m, lo, hi",
    [("edm", 0.002, 2.0, 0.002, 80.0), ("vp", 0.002, 2.0, 0.001, 152.17), ("ve", 0.02, 1.0, 0.02, 100.0)],
)
def test_sigma_space_defaults_are_the_papers(variant, sigma_min, m, lo, hi):
    sched = FDMEDMScheduler(variant=variant)
    assert (sched.config.sigma_min, sched.config.sigma_max, sched.config.m) == (sigma_min, 80.0, m)
    assert FDMEDMScheduler.from_config(sched.config).config.m == m  # stored, so a round trip keeps it
    for sigma in (0.05, 1.0, 80.0):
        assert sched.c_in(sigma).item() == pytest.approx(authors_s(sigma, m, lo, hi), rel=1e-5)
    # explicit values are respected in every variant (VE with m = 2, as the authors' script meant it)
    other = FDMEDMScheduler(variant=variant, m=3.0, sigma_min=0.01)
    assert (other.config.m, other.config.sigma_min) == (3.0, 0.01)
    assert other.c_in(1.0).item() == pytest.approx(authors_s(1.0, 3.0, lo, hi), rel=1e-5)


def test_s_at_80_depends_on_the_variant():
    # "s(80) = 0.024" holds for VP-FDM (m = 2) only
    assert FDMEDMScheduler(variant="vp").c_in(80.0).item() == pytest.approx(0.0243, abs=2e-4)
    assert FDMEDMScheduler(variant="ve").c_in(80.0).item() == pytest.approx(0.0118, abs=2e-4)
    assert FDMEDMScheduler(variant="edm").c_in(80.0).item() == pytest.approx(3.9e-8, rel=0.05)


@pytest.mark.parametrize("cls", [FDMDDIMScheduler, FDMDPMSolverMultistepScheduler])
@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_discrete_authors_range_starts_at_sigma_80(cls, spacing):
    sched = cls(sigma_range="authors", timestep_spacing=spacing)
    assert (sched.process.sigma_min, sched.process.sigma_max) == (0.001, 152.17)
    sigmas = sched.process.sigmas
    top = int((sigmas <= 80).nonzero().max())
    assert sigmas[top] <= 80 < sigmas[top + 1] and sched.num_sampling_timesteps == top + 1
    sched.set_timesteps(10)
    assert sched.timesteps.max() <= top
    if spacing != "leading":
        assert abs(int(sched.timesteps[0]) - top) <= 1
    sigma0 = sigmas[sched.timesteps[0]].item()
    k = authors_s(sigma0, 2.0, 0.001, 152.17) * math.sqrt(1 + sigma0**2)
    assert sched.init_noise_sigma == pytest.approx(k, rel=1e-6)
    # the calibrated default keeps the whole schedule; max_sampling_sigma caps it explicitly
    assert cls(timestep_spacing=spacing).num_sampling_timesteps == 1000
    capped = cls(timestep_spacing=spacing, max_sampling_sigma=10.0)
    assert sigmas[capped.num_sampling_timesteps - 1] <= 10 < sigmas[capped.num_sampling_timesteps]


def test_discrete_authors_range_errors():
    with pytest.raises(ValueError, match="`sigma_range`"):
        FDMDDIMScheduler(sigma_range="paper")
    with pytest.raises(ValueError, match="`max_sampling_sigma`"):
        FDMDDIMScheduler(max_sampling_sigma=1e-4).set_timesteps(5)

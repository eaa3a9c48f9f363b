import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_stages import FDMDDIMScheduler, FDMEDMScheduler, FDMLossWarmup, TimestepStages
from diffusers_stages.schedulers.fdm import FDM_SIGMA_RANGES
from diffusers_stages.testing import tiny_unet_2d
from diffusers_stages.training import TrainingConfig, build_noise_process
from diffusers_stages.training.noise_levels import LogNormalSigma, LogUniformSigma, VPSigma
from diffusers_stages.training.objectives import DiscreteObjective, EDMObjective


@pytest.fixture
def edm():
    return EDMObjective(FDMEDMScheduler(input_scaling="baseline", noise_conditioning="index"))


def test_edm_stages_partition_the_lognormal(edm):
    stages = TimestepStages([300, 700])
    w = edm.stage_weights(stages)
    assert w.sum().item() == pytest.approx(1.0) and (w > 0).all()
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        sigma = edm.sample_levels(stages, k, 2000, g)
        assert edm.stage_of(stages, sigma).eq(k).all()
        # the model's conditioning routes to the same stage through the TimestepStages
        assert stages.stage_index(edm.timesteps(sigma)).eq(k).all()
    # drawing a stage by its weight and then a sigma inside it reproduces the log-normal
    ks = torch.multinomial(w.float(), 4000, replacement=True, generator=g)
    sig = torch.cat([edm.sample_levels(stages, int(k), 1, g) for k in ks])
    assert sig.log().mean().item() == pytest.approx(-1.2, abs=0.08) and sig.log().std().item() == pytest.approx(
        1.2, abs=0.08
    )


def test_edm_loss_matches_reference_formula(edm):
    unet = tiny_unet_2d()
    x0, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.7, 30.0])
    got = edm.loss(unet, x0, noise, sigma)
    sd, s = 0.5, sigma.view(-1, 1, 1, 1)
    x = x0 + s * noise
    c_in, c_skip, c_out = 1 / (s**2 + sd**2).sqrt(), sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    t = 999 * (sigma.log() - torch.tensor(0.002).log()) / (torch.tensor(80.0).log() - torch.tensor(0.002).log())
    d = c_skip * x + c_out * unet(c_in * x, t).sample
    ref = (sigma**2 + sd**2) / (sigma * sd) ** 2 * ((d - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fdm_warmup_clamps_the_weight():
    obj = EDMObjective(
        FDMEDMScheduler(input_scaling="fdm", noise_conditioning="index"), warmup=FDMLossWarmup(warmup_steps=10)
    )
    w = obj.loss_weight(torch.tensor([0.01, 1.0]))
    assert w[0].item() == pytest.approx(5.0) and w[1].item() == pytest.approx(1.25 / 0.25)


def test_discrete_loss_and_stage_sampling():
    sched = DDPMScheduler()
    obj = DiscreteObjective(sched)
    stages = TimestepStages([250])
    g = torch.Generator().manual_seed(0)
    t = obj.sample_levels(stages, 1, 500, g)
    assert t.min() >= 250 and obj.stage_of(stages, t).eq(1).all()
    assert obj.stage_weights(stages).tolist() == [0.25, 0.75]
    unet = tiny_unet_2d()
    x0, noise, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    ref = ((unet(sched.add_noise(x0, noise, t), t).sample - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(obj.loss(unet, x0, noise, t), ref)
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteObjective(sched, prediction_type="flow")


# ---------------------------------------------------------------- the three sigma distributions (EDM's Table 1)
def vp_sigma_reference(t, beta_min=0.1, beta_d=19.9):
    """The FDM / EDM authors' VP sigma(t)."""
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()


def test_ve_distribution_is_the_authors_log_uniform():
    dist = LogUniformSigma()
    u = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dist.icdf(u), 0.02 * (100 / 0.02) ** u)  # VELoss: sigma_min (sigma_max/sigma_min)^u
    log_sigma = LogUniformSigma().icdf(torch.linspace(0, 1, 100_001, dtype=torch.float64)).log()
    a, b = math.log(0.02), math.log(100.0)
    assert log_sigma.mean().item() == pytest.approx((a + b) / 2, rel=1e-4)
    assert log_sigma.var().item() == pytest.approx((b - a) ** 2 / 12, rel=1e-3)


def test_vp_distribution_is_the_authors_uniform_t():
    dist = VPSigma()
    u = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # VPLoss draws sigma(1 + u (epsilon_t - 1)): the same law as sigma(epsilon_t + u (1 - epsilon_t)) with u -> 1 - u
    torch.testing.assert_close(dist.icdf(1 - u), vp_sigma_reference(1 + u * (1e-5 - 1)))
    assert dist.icdf(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(0.001, rel=1e-3)
    assert dist.icdf(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(152.17, rel=1e-4)
    torch.testing.assert_close(dist.cdf(dist.icdf(u).log()), u)
    assert dist.cdf(torch.tensor([-math.inf, math.inf])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("variant", ["edm", "vp", "ve"])
def test_stages_partition_each_distribution(variant):
    dist = {"edm": LogNormalSigma(), "vp": VPSigma(), "ve": LogUniformSigma()}[variant]
    obj = EDMObjective(FDMEDMScheduler(variant=variant, noise_conditioning="index"), dist)
    stages = TimestepStages([300, 700])
    w = obj.stage_weights(stages)
    assert w.sum().item() == pytest.approx(1.0) and (w > 0).all()
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        assert obj.stage_of(stages, obj.sample_levels(stages, k, 500, g)).eq(k).all()
    # a stage drawn by its weight, then sigma inside it: the marginal is the distribution (its CDF is uniform)
    counts = torch.multinomial(w.float(), 4000, replacement=True, generator=g).bincount(minlength=3)
    u = dist.cdf(torch.cat([obj.sample_levels(stages, k, int(n), g) for k, n in enumerate(counts)]).double().log())
    assert u.mean().item() == pytest.approx(0.5, abs=0.02) and u.var().item() == pytest.approx(1 / 12, abs=0.01)


@pytest.mark.parametrize("noise_process", ["vp_fdm", "ve_fdm", "vp", "ve"])
def test_vp_and_ve_losses_match_the_authors_formula(noise_process):
    config = TrainingConfig(noise_process=noise_process, fdm_warmup_steps=10)
    obj, sched, warmup = build_noise_process(config)
    variant, fdm = noise_process[:2], noise_process.endswith("_fdm")
    assert (sched.config.variant, sched.config.input_scaling) == (variant, "fdm" if fdm else "baseline")
    assert isinstance(obj.distribution, VPSigma if variant == "vp" else LogUniformSigma)
    assert (warmup is not None) == fdm  # the authors' baselines have no warm-up
    unet = tiny_unet_2d()
    x0, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.05, 0.7, 30.0])
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * noise
    lo, hi = FDM_SIGMA_RANGES[variant]
    m = 1.0 if variant == "ve" else 2.0  # the paper's: the authors' VE network ignores m
    tau = (s - lo) / (hi - lo)
    b = m * (0.1 * tau + 0.5 * 19.9 * tau**2)
    c_in = ((-b).exp() * (1 + b)) if fdm else (1 / (1 + s**2).sqrt() if variant == "vp" else torch.ones_like(s))
    c_out = -s if variant == "vp" else s  # c_skip = 1
    sigma_min = 0.02 if variant == "ve" else 0.002  # the sampler's range sets the index conditioning
    t = 999 * (sigma.log() - math.log(sigma_min)) / (math.log(80.0) - math.log(sigma_min))
    d = x + c_out * unet(c_in * x, t).sample
    weight = (1 / sigma**2).clamp(max=5.0) if fdm else 1 / sigma**2  # warm-up: c = 5 at step 0
    ref = weight * ((d - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(obj.loss(unet, x0, noise, sigma), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the discrete path's warm-up
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_discrete_warmup_weight(prediction_type):
    sched = FDMDDIMScheduler(prediction_type=prediction_type)
    warmup = FDMLossWarmup(warmup_steps=3)
    obj = DiscreteObjective(sched, warmup=warmup)
    t = torch.tensor([0, 10, 50, 200, 999])
    abar = sched.alphas_cumprod.double()[t]
    sigma2 = (1 - abar) / abar
    for c in (5.0, 5.0 * 100 ** (1 / 3)):
        want = {  # the authors' clamp min(lambda, c) in clean-image terms, divided by lambda
            "epsilon": (c * sigma2).clamp(max=1),  # min(1, c sigma^2)
            "v_prediction": (c * sigma2 / (1 + sigma2)).clamp(max=1),
            "sample": torch.ones_like(sigma2),
        }[prediction_type]
        torch.testing.assert_close(obj.loss_weight(t), want.float())
        warmup.step()
    warmup.step()  # finished: no clamp
    assert obj.loss_weight(t).eq(1).all() and DiscreteObjective(sched).loss_weight(t).eq(1).all()
    if prediction_type == "epsilon":  # the weight multiplies the per-sample eps loss
        warmup.num_steps = 0
        unet, x0, noise = tiny_unet_2d(), torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
        ref = ((unet(sched.add_noise(x0, noise, t), t).sample - noise) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(obj.loss(unet, x0, noise, t), (5 * sigma2).clamp(max=1).float() * ref)


def test_discrete_fdm_process_gets_the_warmup():
    obj, _, warmup = build_noise_process(TrainingConfig(noise_process="fdm"))
    assert obj.warmup is warmup and warmup.warmup_steps == 400
    obj, _, warmup = build_noise_process(TrainingConfig(noise_process="fdm", fdm_warmup_steps=0))
    assert obj.warmup is None and warmup is None
    assert build_noise_process(TrainingConfig(noise_process="ddpm"))[2] is None
    _, sched, _ = build_noise_process(TrainingConfig(noise_process="fdm", fdm_sigma_range="authors"))
    assert sched.config.sigma_range == "authors" and sched.process.sigma_max == 152.17

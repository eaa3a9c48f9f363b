import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_stages import FDMEDMScheduler, FDMLossWarmup, TimestepStages
from diffusers_stages.testing import tiny_unet_2d
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

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_stages.clustering import NoiseSchedule


def test_vp_schedule_matches_the_paper_formula():
    s = NoiseSchedule.vp(num_train_timesteps=50)
    for i in (0, 17, 49):
        t = (i + 1) / 50
        abar = math.exp(-(0.1 * t + 0.5 * 19.9 * t * t))
        assert s.alphas_cumprod[i].item() == pytest.approx(abar, rel=1e-12)
        assert s.sigmas[i].item() == pytest.approx(math.sqrt((1 - abar) / abar), rel=1e-12)
        assert s.times[i].item() == pytest.approx(t)
    assert s.sigmas[-1].item() == pytest.approx(152.17, abs=0.01)  # the VP-SDE's sigma_max
    assert torch.allclose(s.log_snr, -2 * s.sigmas.log())


@pytest.mark.parametrize("form", ["instance", "config", "path"])
def test_from_scheduler_instance_config_and_path(form, tmp_path):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    source = {"instance": sched, "config": json.loads(sched.to_json_string()), "path": tmp_path}[form]
    if form == "path":
        sched.save_config(tmp_path)
    s = NoiseSchedule.from_scheduler(source)
    assert s.name == "DDIMScheduler"
    assert s.num_train_timesteps == 1000
    abar = sched.alphas_cumprod.double()
    assert torch.allclose(s.alphas_cumprod, abar)
    assert torch.allclose(s.sigmas, ((1 - abar) / abar).sqrt())


def test_from_scheduler_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="scheduler"):
        NoiseSchedule.from_scheduler(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown scheduler class"):
        NoiseSchedule.from_scheduler({"_class_name": "NoSuchScheduler"})
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_scheduler(object())
    with pytest.raises(ValueError, match="decreasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(torch.tensor([0.9, 0.0]))
    assert NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=10)).num_train_timesteps == 10
    # a bare config without `_class_name` is read as a DDPMScheduler config
    assert NoiseSchedule.from_scheduler({"num_train_timesteps": 10}).name == "DDPMScheduler"

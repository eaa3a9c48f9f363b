import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_stages import TimestepStages
from diffusers_stages.clustering import NoiseSchedule, cluster_timesteps


def test_uniform_is_equal_thirds():
    stages = cluster_timesteps("uniform", 3)
    assert stages == TimestepStages.uniform(3) and stages.config.method == "uniform"


@pytest.mark.parametrize("schedule", [None, DDPMScheduler(num_train_timesteps=1000)])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_snr_boundaries_split_log_snr_evenly(schedule, k):
    stages = cluster_timesteps("snr", k, noise_schedule=schedule)
    lam = (NoiseSchedule.vp() if schedule is None else NoiseSchedule.from_scheduler(schedule)).log_snr
    assert stages.num_stages == k and stages.config.method == "snr"
    for j, b in enumerate(stages.boundaries, start=1):
        level = lam[0] + j / k * (lam[-1] - lam[0])
        # the boundary is the first timestep at or below the level (oracle: a linear scan)
        assert b == next(t for t in range(len(lam)) if lam[t] <= level)


def test_snr_keeps_stages_non_empty_on_a_short_grid():
    stages = cluster_timesteps("snr", 6, num_train_timesteps=6)
    assert stages.boundaries == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("method", ["uniform", "snr"])
def test_baselines_reject_bad_stage_counts(method):
    for k in (0, -1, 11):
        with pytest.raises(ValueError, match="num_stages"):
            cluster_timesteps(method, k, num_train_timesteps=10)


def test_details_hold_the_log_snr_curve():
    out = cluster_timesteps("snr", 3, num_train_timesteps=100, return_details=True)
    assert out.similarity is None
    assert torch.equal(out.grid_timesteps, torch.arange(100))
    assert torch.allclose(out.curves["log_snr"], NoiseSchedule.vp(100).log_snr)

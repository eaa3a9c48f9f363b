import itertools
import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_stages import TimestepStages
from diffusers_stages.clustering import NoiseSchedule, cluster_timesteps, interval_clustering


def test_uniform_is_equal_thirds():
    stages = cluster_timesteps("uniform", 3)
    assert stages == TimestepStages.uniform(3) and stages.config.method == "uniform"


def reference_interval_clustering(d, k):
    """Oracle: every partition of n points into k intervals with the authors' sizes (after the first: floor(n / 2k)
    to ceil(3n / 2k) points; the first: at least floor(n / 2k) + 1), costed by sum_j d[middle][j]; the cheapest."""
    n = len(d)
    lo, hi = math.floor(n / (2 * k)), math.ceil(3 * n / (2 * k))
    best = None
    for starts in itertools.combinations(range(1, n), k - 1):
        edges = [0, *starts, n]
        sizes = [b - a for a, b in zip(edges, edges[1:])]
        if sizes[0] < lo + 1 or any(not lo <= s <= hi for s in sizes[1:]):
            continue
        cost = sum(sum(d[a + (b - a) // 2][j] for j in range(a, b)) for a, b in zip(edges, edges[1:]))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, list(starts))
    return best[1]


@pytest.mark.parametrize("n, k", [(9, 2), (10, 3), (12, 4), (7, 3)])
def test_interval_clustering_matches_brute_force(n, k):
    d = torch.rand(n, n, generator=torch.Generator().manual_seed(n + k)).double()
    assert interval_clustering(d, k) == reference_interval_clustering(d.tolist(), k)


def test_snr_is_the_authors_interval_clustering():
    # the authors' snr_cluster.py on the VP-SDE (beta 0.1..20, t = (i + 1) / 1000): stages start at t = 0.348, 0.709
    stages = cluster_timesteps("snr", 3)
    assert stages.config.method == "snr"
    assert [(b + 1) / 1000 for b in stages.boundaries] == [0.348, 0.709]
    lam = NoiseSchedule.vp(30).log_snr
    assert cluster_timesteps("snr", 3, num_train_timesteps=30).boundaries == reference_interval_clustering(
        (lam[:, None] - lam[None]).abs().tolist(), 3
    )


@pytest.mark.parametrize("schedule", [None, DDPMScheduler(num_train_timesteps=1000)])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_uniform_log_snr_boundaries_split_log_snr_evenly(schedule, k):
    stages = cluster_timesteps("uniform_log_snr", k, noise_schedule=schedule)
    lam = (NoiseSchedule.vp() if schedule is None else NoiseSchedule.from_scheduler(schedule)).log_snr
    assert stages.num_stages == k and stages.config.method == "uniform_log_snr"
    for j, b in enumerate(stages.boundaries, start=1):
        level = lam[0] + j / k * (lam[-1] - lam[0])
        # the boundary is the first timestep at or below the level (oracle: a linear scan)
        assert b == next(t for t in range(len(lam)) if lam[t] <= level)


def test_uniform_log_snr_keeps_stages_non_empty_on_a_short_grid():
    stages = cluster_timesteps("uniform_log_snr", 6, num_train_timesteps=6)
    assert stages.boundaries == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("method", ["uniform", "snr", "uniform_log_snr"])
def test_baselines_reject_bad_stage_counts(method):
    for k in (0, -1, 11):
        with pytest.raises(ValueError, match="num_stages"):
            cluster_timesteps(method, k, num_train_timesteps=10)


def test_details_hold_the_log_snr_curve():
    out = cluster_timesteps("snr", 3, num_train_timesteps=100, return_details=True)
    assert out.similarity is None
    assert torch.equal(out.grid_timesteps, torch.arange(100))
    assert torch.allclose(out.curves["log_snr"], NoiseSchedule.vp(100).log_snr)

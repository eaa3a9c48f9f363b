"""Data-free baselines: uniform timesteps, the multi-stage authors' SNR clustering, and equal log-SNR widths (ours)."""

from __future__ import annotations

from typing import Union

import torch

from ..stages import TimestepStages
from .interval import interval_clustering
from .noise_schedule import NoiseSchedule, as_noise_schedule
from .segmentation import TimestepClusteringOutput, check_num_stages


def _baseline_output(stages: TimestepStages, schedule: NoiseSchedule) -> TimestepClusteringOutput:
    timesteps = torch.arange(schedule.num_train_timesteps)
    return TimestepClusteringOutput(stages=stages, grid_timesteps=timesteps, curves={"log_snr": schedule.log_snr})


def uniform_clustering(num_stages: int, noise_schedule: Union[NoiseSchedule, object, None] = None):
    r"""
    ``K`` stages of (nearly) equal length in timesteps: boundary ``k`` is ``round(k T / K)``.

    Args:
        num_stages (`int`): ``K``, in ``[1, T]``.
        noise_schedule (*optional*): only its length ``T`` matters (default: the VP-SDE with ``T = 1000``).
    """
    schedule = as_noise_schedule(noise_schedule)
    check_num_stages(num_stages, schedule.num_train_timesteps, "num_train_timesteps")
    stages = TimestepStages.uniform(num_stages, schedule.num_train_timesteps)
    return _baseline_output(stages, schedule)


def snr_clustering(num_stages: int, noise_schedule: Union[NoiseSchedule, object, None] = None):
    r"""
    The multi-stage paper's SNR-based ablation baseline as the authors' code computes it: the size-constrained
    interval clustering (:func:`~diffusers_stages.clustering.interval.interval_clustering`) of all ``T`` timesteps
    with the log-SNR distance ``d[m, j] = |lambda_m - lambda_j|``, ``lambda_t = log(abar_t / (1 - abar_t))``. On
    the paper's VP-SDE (T = 1000) the three stages start at t = 0.348 and 0.709 (indices 347, 708), as in their
    code.

    Args:
        num_stages (`int`): ``K``, in ``[1, T]``.
        noise_schedule (*optional*): the schedule whose log-SNR is clustered (default: the VP-SDE with ``T = 1000``).
    """
    schedule = as_noise_schedule(noise_schedule)
    check_num_stages(num_stages, schedule.num_train_timesteps, "num_train_timesteps")
    lam = schedule.log_snr
    bounds = interval_clustering((lam[:, None] - lam[None, :]).abs(), num_stages)
    stages = TimestepStages(bounds, num_train_timesteps=schedule.num_train_timesteps, method="snr")
    return _baseline_output(stages, schedule)


def uniform_log_snr_clustering(num_stages: int, noise_schedule: Union[NoiseSchedule, object, None] = None):
    r"""
    Ours (not the paper's baseline): ``K`` stages of equal width in log-SNR, ``lambda_t = log(abar_t / (1 -
    abar_t))``: boundary ``k`` is the first timestep with ``lambda_t <= lambda_0 + (k / K) (lambda_{T-1} -
    lambda_0)`` (kept strictly increasing).

    Args:
        num_stages (`int`): ``K``, in ``[1, T]``.
        noise_schedule (*optional*): the schedule whose log-SNR is split (default: the VP-SDE with ``T = 1000``).
    """
    schedule = as_noise_schedule(noise_schedule)
    t = schedule.num_train_timesteps
    check_num_stages(num_stages, t, "num_train_timesteps")
    lam = schedule.log_snr
    levels = lam[0] + torch.arange(1, num_stages, dtype=torch.float64) / num_stages * (lam[-1] - lam[0])
    bounds, previous = [], 0
    for k, level in enumerate(levels, start=1):
        b = int((lam > level).sum())  # lambda is decreasing: the count is the first index at or below the level
        b = min(max(b, previous + 1), t - (num_stages - k))
        bounds.append(b)
        previous = b
    return _baseline_output(TimestepStages(bounds, num_train_timesteps=t, method="uniform_log_snr"), schedule)

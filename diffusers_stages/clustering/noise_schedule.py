"""The noise schedule seen by timestep clustering: ``abar_t`` and ``sigma_t`` per index of the training time grid.

Two sources are accepted: the multi-stage paper's continuous VP-SDE (``beta_min = 0.1``, ``beta_max = 20``,
``t in (0, 1]``) discretised onto ``T`` grid points, and any diffusers scheduler (or scheduler config) that has
``alphas_cumprod`` (``DDPMScheduler``, ``DDIMScheduler``, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any, Union

import torch


class NoiseSchedule:
    r"""
    The cumulative signal rates ``abar_t`` of a VP diffusion over the grid ``t = 0, ..., T - 1`` (increasing noise).

    The VE-equivalent noise level of index ``t`` is ``sigma_t = sqrt((1 - abar_t) / abar_t)``: a VP sample
    ``x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps`` divided by ``sqrt(abar_t)`` is ``y + sigma_t eps``.

    Args:
        alphas_cumprod (`torch.Tensor`):
            ``abar_t`` for every grid index, strictly decreasing, in ``(0, 1]``; stored in float64.
        times (`torch.Tensor`, *optional*):
            The continuous time of each grid index (``(t + 1) / T`` for the VP-SDE); defaults to ``t / T``.
        name (`str`, *optional*):
            A label for reports (``"vp"`` or the scheduler's class name).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, times: torch.Tensor | None = None, name: str | None = None):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 1:
            raise ValueError("`alphas_cumprod` must hold at least one value.")
        if not bool(((abar > 0) & (abar <= 1)).all()):
            raise ValueError("`alphas_cumprod` must lie in (0, 1].")
        if not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("`alphas_cumprod` must be strictly decreasing (noise grows with the timestep).")
        self.alphas_cumprod = abar
        n = abar.numel()
        self.times = (
            torch.arange(n, dtype=torch.float64) / n if times is None else torch.as_tensor(times, dtype=torch.float64)
        )
        self.name = name

    @classmethod
    def vp(cls, num_train_timesteps: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0) -> NoiseSchedule:
        r"""
        The continuous VP-SDE of Song et al. on the grid ``t_i = (i + 1) / T``, ``i = 0, ..., T - 1``:
        ``abar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))``.

        Args:
            num_train_timesteps (`int`, defaults to 1000): the grid size ``T``.
            beta_min (`float`, defaults to 0.1): ``beta(0)``.
            beta_max (`float`, defaults to 20.0): ``beta(1)``.
        """
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be a positive int, got {num_train_timesteps!r}.")
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= `beta_min` < `beta_max`, got {beta_min} and {beta_max}.")
        t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        abar = torch.exp(-(beta_min * t + 0.5 * (beta_max - beta_min) * t**2))
        return cls(abar, times=t, name="vp")

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """
        From a diffusers scheduler instance, its config (a dict or `FrozenDict`), or the path of a scheduler
        config (a ``scheduler_config.json`` file or the folder holding it). The scheduler class is the config's
        ``_class_name`` (``DDPMScheduler`` when absent).
        """
        if isinstance(scheduler, (str, os.PathLike)):
            path = os.fspath(scheduler)
            if os.path.isdir(path):
                path = os.path.join(path, "scheduler_config.json")
            if not os.path.isfile(path):
                raise ValueError(f"`scheduler`: no scheduler config found at {path}.")
            with open(path) as f:
                scheduler = json.load(f)
        if isinstance(scheduler, dict):
            import diffusers

            class_name = scheduler.get("_class_name", "DDPMScheduler")
            scheduler_cls = getattr(diffusers, class_name, None)
            if scheduler_cls is None:
                raise ValueError(f"`scheduler`: unknown scheduler class {class_name!r} in the config.")
            scheduler = scheduler_cls.from_config(scheduler)
        abar = getattr(scheduler, "alphas_cumprod", None)
        if abar is None:
            raise ValueError(
                f"`scheduler` must have `alphas_cumprod` (a DDPM-style scheduler), got {type(scheduler).__name__}."
            )
        return cls(abar, name=type(scheduler).__name__)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def sigmas(self) -> torch.Tensor:
        """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for every grid index (float64)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def log_snr(self) -> torch.Tensor:
        """``log SNR_t = log(abar_t / (1 - abar_t)) = -2 log sigma_t``."""
        return -2 * self.sigmas.log()

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_train_timesteps={self.num_train_timesteps})"


def as_noise_schedule(noise_schedule: Union[NoiseSchedule, Any, None], num_train_timesteps: int = 1000):
    """A `NoiseSchedule` from ``None`` (the paper's VP-SDE with ``num_train_timesteps`` points), a schedule, a
    scheduler, a scheduler config or its path."""
    if noise_schedule is None:
        return NoiseSchedule.vp(num_train_timesteps)
    if isinstance(noise_schedule, NoiseSchedule):
        return noise_schedule
    return NoiseSchedule.from_scheduler(noise_schedule)

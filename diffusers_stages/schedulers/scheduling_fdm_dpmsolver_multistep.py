"""DPM-Solver++(2M) on the discrete FDM-VP process (Stable Diffusion / DDPM eps-, v- and x0-prediction UNets)."""

from __future__ import annotations

import math
from typing import Literal, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .fdm import FDMSchedulerOutput, FDMVPSchedulerMixin, vp_inference_timesteps


class FDMDPMSolverMultistepScheduler(FDMVPSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""
    DPM-Solver++(2M) (Lu et al. 2022, https://huggingface.co/papers/2211.01095) for models trained on the FDM
    momentum-diffusion process over a DDPM beta schedule.

    The state is the network input ``y_t = s_t (x0 + sigma_t eps)``; the solver runs on the normalised state
    ``z = y / s_t`` with half-log-SNR ``lambda = -ln sigma``. With ``h = ln(sigma_t / sigma_next)`` and the previous
    step's ``h_last``, ``r = h_last / h``:

        D'     = (1 + 1 / (2 r)) D_t - 1 / (2 r) D_last        (first step and sigma_next = 0: D' = D_t)
        z_next = (sigma_next / sigma_t) z + (1 - sigma_next / sigma_t) D',      y_next = s_next z_next.

    The last step goes to ``sigma = 0`` and returns ``D``. With ``input_scaling="baseline"`` this is DPM-Solver++(2M)
    on the DDPM state.

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``.
        beta_start (`float`, defaults to 0.0001), beta_end (`float`, defaults to 0.02): The DDPM beta range.
        beta_schedule (`"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`, defaults to `"linear"`):
            The DDPM beta schedule.
        trained_betas (`np.ndarray` or `list[float]`, *optional*): Explicit betas, overriding the schedule.
        prediction_type (`"epsilon"`, `"v_prediction"` or `"sample"`, defaults to `"epsilon"`): The network target.
        timestep_spacing (`"leading"`, `"trailing"` or `"linspace"`, defaults to `"linspace"`), steps_offset (`int`):
            The inference grid, as in diffusers.
        input_scaling (`"fdm"` or `"baseline"`, defaults to `"fdm"`): FDM's ``s_t`` or DDPM's ``sqrt(abar_t)``.
        m (`float`, defaults to 2.0), beta_min (`float`, defaults to 0.1), beta_d (`float`, defaults to 19.9):
            The FDM kernel (see `fdm_scale`).
        sigma_min (`float`, *optional*): The kernel's ``sigma_min``; defaults to ``sigma_0``.
        sigma_max (`float`, *optional*): The kernel's ``sigma_max``; defaults to `fdm_calibrated_sigma_max`
            (``k_{T-1} = 1``, see `FDMDDIMScheduler`).
        sigma_range (`"calibrated"` or `"authors"`, defaults to `"calibrated"`): ``"authors"``: the unset kernel range
            is the authors' VP-FDM one (0.001 .. 152.17) and sampling starts at the largest timestep with
            ``sigma_t <= 80``, as their sampler does (``init_noise_sigma`` is then ``k_t`` there, ~1.95 for linear betas:
            use a pipeline that applies it, not `DDPMPipeline`).
        max_sampling_sigma (`float`, *optional*): Start sampling at the largest timestep with ``sigma_t <=`` this
            (default: 80 with ``sigma_range="authors"``, else no limit).
        rescale_betas_zero_snr (`bool`, defaults to `False`): Must be `False`: zero terminal SNR (an infinite
            ``sigma_{T-1}``) has no FDM state; read from diffusers configs so that it is refused, not ignored.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        trained_betas: Union[np.ndarray, list[float], None] = None,
        prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "linspace",
        steps_offset: int = 0,
        input_scaling: Literal["fdm", "baseline"] = "fdm",
        m: float = 2.0,
        beta_min: float = 0.1,
        beta_d: float = 19.9,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_range: Literal["calibrated", "authors"] = "calibrated",
        max_sampling_sigma: float | None = None,
        rescale_betas_zero_snr: bool = False,
    ):
        self._build_process()

    def _inference_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """diffusers' multistep grid: ``N + 1`` points without the smallest for "leading" / "linspace" (the last step
        goes from there to ``sigma = 0``), ``T - 1, T - 1 - T / N, ...`` for "trailing"."""
        cfg, n = self.config, self.num_sampling_timesteps
        if cfg.timestep_spacing == "trailing":
            return vp_inference_timesteps(n, num_inference_steps, "trailing", cfg.steps_offset)
        if not isinstance(num_inference_steps, int) or not 0 < num_inference_steps < n:
            raise ValueError(
                f"`num_inference_steps` must be an int in [1, {n}) (the sampling timesteps), got {num_inference_steps!r}."
            )
        grid = vp_inference_timesteps(n, num_inference_steps + 1, cfg.timestep_spacing, cfg.steps_offset)
        return grid[:-1]

    def _reset(self) -> None:
        self._last_denoised = None
        self._last_sigma = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Union[FDMSchedulerOutput, tuple]:
        """
        One DPM-Solver++(2M) step from ``timestep`` to the next timestep of the grid (first order on the first step).

        Args:
            model_output (`torch.Tensor`): The raw network output at ``(sample, timestep)``.
            timestep (`int` or `torch.Tensor`): The current timestep (an element of `timesteps`).
            sample (`torch.Tensor`): The current state ``y_t`` (= the network input).
            generator (`torch.Generator`, *optional*): Unused (the solver is deterministic); accepted for pipelines.
            return_dict (`bool`, defaults to `True`): Return an `FDMSchedulerOutput` or a tuple.

        Returns:
            `FDMSchedulerOutput` or `tuple`: ``(prev_sample, pred_original_sample)``.
        """
        z, denoised, sigma, sigma_next = self._normalise(model_output, timestep, sample)
        if sigma_next == 0:
            z_next = denoised
        else:
            d = denoised
            if self._last_denoised is not None:
                r = math.log(self._last_sigma / sigma) / math.log(sigma / sigma_next)
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self._last_denoised
            z_next = (sigma_next / sigma) * z + (1 - sigma_next / sigma) * d
        self._last_denoised, self._last_sigma = denoised, sigma
        return self._output(z_next, sigma_next, denoised, sample, return_dict)

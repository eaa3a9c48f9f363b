"""Deterministic DDIM on the discrete FDM-VP process (Stable Diffusion / DDPM eps-, v- and x0-prediction UNets)."""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .fdm import FDMSchedulerOutput, FDMVPSchedulerMixin


class FDMDDIMScheduler(FDMVPSchedulerMixin, SchedulerMixin, ConfigMixin):
    r"""
    DDIM (``eta = 0``) for models trained on the FDM momentum-diffusion process over a DDPM beta schedule.

    The state and network input at timestep ``t`` is ``y_t = s_t (x0 + sigma_t eps)``, ``sigma_t = sqrt((1 - abar_t)
    / abar_t)``, ``s_t = fdm_scale(sigma_t)``. A step normalises ``z = y_t / s_t``, forms the clean prediction ``D``
    from the raw output (eps: ``z - sigma_t eps``; v: ``abar_t z - sqrt(1 - abar_t) v``; sample: ``x0``) and moves
    along the deterministic DDIM line

        z_prev = D + (sigma_prev / sigma_t) (z - D),      y_prev = s_prev z_prev,

    which is DDIM's ``sqrt(abar_prev) D + sqrt(1 - abar_prev) eps`` rescaled. With ``input_scaling="baseline"`` the
    state is DDPM's and this is exactly diffusers' `DDIMScheduler` with ``eta = 0``.

    Args:
        num_train_timesteps (`int`, defaults to 1000): ``T``.
        beta_start (`float`, defaults to 0.0001), beta_end (`float`, defaults to 0.02):
            The DDPM beta range.
        beta_schedule (`"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`, defaults to `"linear"`):
            The DDPM beta schedule (Stable Diffusion uses "scaled_linear", 0.00085 .. 0.012).
        trained_betas (`np.ndarray` or `list[float]`, *optional*): Explicit betas, overriding the schedule.
        prediction_type (`"epsilon"`, `"v_prediction"` or `"sample"`, defaults to `"epsilon"`):
            What the network predicts; the targets are DDPM's (see `add_noise`, `get_velocity`).
        timestep_spacing (`"leading"`, `"trailing"` or `"linspace"`, defaults to `"leading"`), steps_offset (`int`):
            The inference grid, as in diffusers.
        set_alpha_to_one (`bool`, defaults to `True`):
            Whether the last step goes to ``sigma = 0`` (returns ``D``) or to ``sigma_0``.
        input_scaling (`"fdm"` or `"baseline"`, defaults to `"fdm"`):
            FDM's ``s_t`` or DDPM's ``sqrt(abar_t)``: one class gives both, for same-run comparisons.
        m (`float`, defaults to 2.0), beta_min (`float`, defaults to 0.1), beta_d (`float`, defaults to 19.9):
            The FDM kernel (see `fdm_scale`).
        sigma_min (`float`, *optional*): The kernel's ``sigma_min``; defaults to ``sigma_0`` (so ``s_0 = 1``).
        sigma_max (`float`, *optional*):
            The kernel's ``sigma_max``. Defaults to `fdm_calibrated_sigma_max`: the value that gives the input at
            ``t = T - 1`` unit scale (``k_{T-1} = 1``), so sampling starts from ``N(0, I)`` as in DDPM and the input
            never vanishes. Setting it to ``sigma_{T-1}`` (``tau = 1`` at the top) is the naive choice that measured
            worse than DDPM on MNIST (see the README).
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
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
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

    def _final_sigma(self) -> float:
        return 0.0 if self.config.set_alpha_to_one else float(self.process.sigmas[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Union[FDMSchedulerOutput, tuple]:
        """
        One deterministic DDIM step from ``timestep`` to the next timestep of the grid.

        Args:
            model_output (`torch.Tensor`): The raw network output at ``(sample, timestep)``.
            timestep (`int` or `torch.Tensor`): The current timestep (an element of `timesteps`).
            sample (`torch.Tensor`): The current state ``y_t`` (= the network input).
            generator (`torch.Generator`, *optional*): Unused (the step is deterministic); accepted for pipelines.
            return_dict (`bool`, defaults to `True`): Return an `FDMSchedulerOutput` or a tuple.

        Returns:
            `FDMSchedulerOutput` or `tuple`: ``(prev_sample, pred_original_sample)``.
        """
        z, denoised, sigma, sigma_prev = self._normalise(model_output, timestep, sample)
        z_prev = denoised + (sigma_prev / sigma) * (z - denoised)
        return self._output(z_prev, sigma_prev, denoised, sample, return_dict)

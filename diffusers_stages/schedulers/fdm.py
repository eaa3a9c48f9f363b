r"""
The FDM (Fast Diffusion Model, momentum diffusion) perturbation kernel: all of FDM's math lives in this file.

FDM reads a forward diffusion step as an SGD step on a time-varying quadratic and replaces SGD with critically damped
heavy-ball momentum. With zero initial velocity the continuous limit changes only the data coefficient of the kernel:

    tau      = clamp((sigma - sigma_min) / (sigma_max - sigma_min), 0, 1)
    B(tau)   = beta_min * tau + 0.5 * beta_d * tau**2
    s(sigma) = exp(-m * B) * (1 + m * B)
    x        = s(sigma) * (x0 + sigma * eps)          # p(x | x0) = N(s x0, s^2 sigma^2 I)

The signal-to-noise ratio ``1 / sigma^2`` is the baseline's: FDM rescales the state by ``s(sigma)``, i.e. it replaces
the network's input scaling ``c_in``. The ideal probability-flow ODE in the normalised state ``x / s`` is the
baseline's; the gain comes from a better-conditioned network input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar
from diffusers.utils import BaseOutput

FDMVariant = Literal["vp", "ve", "edm"]

#: The sigma range over which each variant normalises ``tau`` (FDM paper / authors' code).
FDM_SIGMA_RANGES: dict[str, tuple[float, float]] = {
    "vp": (0.001, 152.17),  # VP-SDE with beta 0.1 .. 20
    "ve": (0.02, 100.0),
    "edm": (0.002, 80.0),
}

#: The multiplier ``m`` of the published results per variant: the authors' training script passes 2.0, but their VE
#: network ignores it (``exp(-B) (1 + B)``), so the published VE-FDM is ``m = 1``.
FDM_PAPER_M: dict[str, float] = {"vp": 2.0, "ve": 1.0, "edm": 2.0}

#: The authors' sampling range per variant: EDM's sampler (0.002 .. 80) clamped to the network's sigma range, so VE
#: samples 0.02 .. 80 (and every variant starts at sigma = 80).
FDM_SAMPLER_SIGMA_RANGES: dict[str, tuple[float, float]] = {
    "vp": (0.002, 80.0),
    "ve": (0.02, 80.0),
    "edm": (0.002, 80.0),
}


def check_fdm_kernel_args(m: float, sigma_min: float, sigma_max: float, beta_min: float, beta_d: float) -> None:
    """Raise a `ValueError` naming the argument when the kernel hyper-parameters are invalid."""
    if not m > 0:
        raise ValueError(f"`m` (the FDM multiplier) must be > 0, got {m!r}.")
    if not sigma_min >= 0:
        raise ValueError(f"`sigma_min` must be >= 0, got {sigma_min!r}.")
    if not sigma_min < sigma_max:
        raise ValueError(
            f"`sigma_min` must be smaller than `sigma_max`, got sigma_min={sigma_min!r} >= {sigma_max!r}."
        )
    if beta_min < 0 or beta_d < 0 or beta_min + beta_d <= 0:
        raise ValueError(f"`beta_min` and `beta_d` must be >= 0 and not both 0, got {beta_min!r} and {beta_d!r}.")


def check_variant(variant: str) -> None:
    if variant not in FDM_SIGMA_RANGES:
        raise ValueError(f"`variant` must be one of {sorted(FDM_SIGMA_RANGES)}, got {variant!r}.")


def fdm_scale(
    sigma: Union[float, torch.Tensor],
    m: float = 2.0,
    beta_min: float = 0.1,
    beta_d: float = 19.9,
    sigma_min: float = FDM_SIGMA_RANGES["edm"][0],
    sigma_max: float = FDM_SIGMA_RANGES["edm"][1],
) -> torch.Tensor:
    r"""
    The FDM data coefficient ``s(sigma) = exp(-m B) (1 + m B)``, ``B = beta_min tau + beta_d tau^2 / 2``.

    Args:
        sigma (`float` or `torch.Tensor`):
            Noise level(s) (VE form: ``x0 + sigma * eps``). The result has the same shape (and floating dtype).
        m (`float`, defaults to 2.0):
            The multiplier (oscillator frequency) of the critically damped momentum; the authors use 2.0 (1.0 for
            FFHQ). Must be > 0.
        beta_min (`float`, defaults to 0.1), beta_d (`float`, defaults to 19.9):
            The linear VP-SDE beta schedule ``beta(tau) = beta_min + beta_d tau`` integrated into ``B(tau)``.
        sigma_min (`float`), sigma_max (`float`):
            The sigma range mapped to ``tau in [0, 1]``; defaults to the EDM variant's 0.002 .. 80 (see
            `FDM_SIGMA_RANGES`). ``tau`` is clamped to ``[0, 1]``, so ``s(sigma <= sigma_min) = 1``.

    Returns:
        `torch.Tensor`: ``s(sigma)``, in ``(0, 1]``, decreasing in ``sigma``.
    """
    check_fdm_kernel_args(m, sigma_min, sigma_max, beta_min, beta_d)
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    tau = ((sigma - sigma_min) / (sigma_max - sigma_min)).clamp(0.0, 1.0)
    mb = m * (beta_min * tau + 0.5 * beta_d * tau**2)
    return torch.exp(-mb) * (1.0 + mb)


def _solve_scale(target: float) -> float:
    """The ``x > 0`` with ``exp(-x) (1 + x) = target`` for ``0 < target < 1`` (bisection; the map is decreasing)."""
    lo, hi = 0.0, 1.0
    while math.exp(-hi) * (1 + hi) > target:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.exp(-mid) * (1 + mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def fdm_calibrated_sigma_max(
    sigma_top: float, sigma_min: float, m: float = 2.0, beta_min: float = 0.1, beta_d: float = 19.9
) -> float:
    r"""
    The kernel ``sigma_max`` that makes the FDM network input at ``sigma_top`` have the DDPM scale:
    ``k = s(sigma_top) * sqrt(1 + sigma_top^2) = 1``.

    This is the default of the discrete FDM schedulers: the state at the top of the training schedule then has unit
    variance exactly like a DDPM state, so pipelines that start from ``N(0, I)`` (e.g. `DDPMPipeline`) start right,
    and the network is never fed a vanishing input (``s ~ 4e-8`` when ``tau = 1`` at the top, which makes an
    eps-prediction blind).

    Args:
        sigma_top (`float`): The largest sigma of the schedule (``sigma_{T-1}``).
        sigma_min (`float`): The kernel's ``sigma_min``.
        m (`float`), beta_min (`float`), beta_d (`float`): As in `fdm_scale`.

    Returns:
        `float`: ``sigma_max`` such that ``fdm_scale(sigma_top, m, beta_min, beta_d, sigma_min, sigma_max)``
        equals ``1 / sqrt(1 + sigma_top^2)``.
    """
    check_fdm_kernel_args(m, sigma_min, sigma_top, beta_min, beta_d)
    x = _solve_scale(1.0 / math.sqrt(1.0 + sigma_top**2))
    b = x / m
    if b >= beta_min + 0.5 * beta_d:
        raise ValueError(
            f"With m={m}, s(sigma) never falls to 1/sqrt(1 + sigma^2) at sigma={sigma_top:.4g} (needs tau > 1): "
            "increase `m` or pass `sigma_max` explicitly."
        )
    # solve 0.5 beta_d tau^2 + beta_min tau = b for tau in (0, 1)
    tau = b / beta_min if beta_d == 0 else (-beta_min + math.sqrt(beta_min**2 + 2 * beta_d * b)) / beta_d
    return sigma_min + (sigma_top - sigma_min) / tau


def vp_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: list[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """DDPM's ``beta_t`` (float64) for diffusers' beta schedules ("linear", "scaled_linear", "squaredcos_cap_v2")."""
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps).to(torch.float64)
    else:
        raise ValueError(
            f"`beta_schedule` must be one of ['linear', 'scaled_linear', 'squaredcos_cap_v2'], got {beta_schedule!r}."
        )
    return betas


def vp_inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int = 0
) -> torch.Tensor:
    """
    Decreasing integer timesteps for sampling, with diffusers' spacings ("leading", "trailing", "linspace"; see
    Table 2 of https://huggingface.co/papers/2305.08891).
    """
    if not isinstance(num_inference_steps, int) or not 0 < num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be an int in [1, num_train_timesteps={num_train_timesteps}], "
            f"got {num_inference_steps!r}."
        )
    n, T = num_inference_steps, num_train_timesteps
    if timestep_spacing == "leading":
        steps = np.arange(n) * (T // n) + steps_offset
    elif timestep_spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[::-1] - 1
    elif timestep_spacing == "linspace":
        steps = np.linspace(0, T - 1, n).round()
    else:
        raise ValueError(
            f"`timestep_spacing` must be one of ['leading', 'linspace', 'trailing'], got {timestep_spacing!r}."
        )
    steps = np.clip(steps, 0, T - 1).astype(np.int64)
    if len(np.unique(steps)) != n:
        raise ValueError(f"{n} inference steps with spacing {timestep_spacing!r} repeat a timestep; use fewer steps.")
    return torch.from_numpy(steps[::-1].copy())


class FDMVPProcess:
    r"""
    The discrete VP (DDPM) forward process with FDM input scaling, shared by the discrete FDM schedulers.

    With ``abar_t`` the DDPM ``alphas_cumprod`` and ``sigma_t = sqrt((1 - abar_t) / abar_t)``, the state and
    network input at timestep ``t`` is

        y_t = s_t * (x0 + sigma_t * eps),     s_t = fdm_scale(sigma_t)        (input_scaling="fdm")
        y_t = sqrt(abar_t) * (x0 + sigma_t * eps)   = the DDPM state           (input_scaling="baseline")

    i.e. ``y_t = k_t * x_t^{DDPM}`` with ``k_t = s_t sqrt(1 + sigma_t^2)``. The noise ``eps`` is the DDPM noise, so
    the eps / v / x0 targets are DDPM's and every solver runs on the normalised state ``z = y / s_t = x0 + sigma eps``.

    Args:
        alphas_cumprod (`torch.Tensor`): The ``T`` values ``abar_t``.
        input_scaling (`"fdm"` or `"baseline"`): FDM's ``s_t`` or the DDPM scale ``sqrt(abar_t)``.
        m, beta_min, beta_d: As in `fdm_scale`.
        sigma_min (`float`, *optional*): The kernel's ``sigma_min``; defaults to ``sigma_0`` (so ``s_0 = 1``).
        sigma_max (`float`, *optional*): The kernel's ``sigma_max``; defaults to `fdm_calibrated_sigma_max` at
            ``sigma_{T-1}``.
        sigma_range (`"calibrated"` or `"authors"`, defaults to `"calibrated"`): Where the unset kernel range comes
            from: the defaults above (ours), or the authors' VP-FDM range ``FDM_SIGMA_RANGES["vp"]`` (0.001 ..
            152.17, the VP-SDE's).
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        input_scaling: Literal["fdm", "baseline"] = "fdm",
        m: float = 2.0,
        beta_min: float = 0.1,
        beta_d: float = 19.9,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_range: Literal["calibrated", "authors"] = "calibrated",
    ):
        if input_scaling not in ("fdm", "baseline"):
            raise ValueError(f"`input_scaling` must be one of ['baseline', 'fdm'], got {input_scaling!r}.")
        if sigma_range not in ("calibrated", "authors"):
            raise ValueError(f"`sigma_range` must be one of ['authors', 'calibrated'], got {sigma_range!r}.")
        if sigma_range == "authors":
            sigma_min = FDM_SIGMA_RANGES["vp"][0] if sigma_min is None else sigma_min
            sigma_max = FDM_SIGMA_RANGES["vp"][1] if sigma_max is None else sigma_max
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.input_scaling = input_scaling
        self.sigma_min = float(self.sigmas[0]) if sigma_min is None else float(sigma_min)
        if sigma_max is None:
            sigma_max = fdm_calibrated_sigma_max(float(self.sigmas[-1]), self.sigma_min, m, beta_min, beta_d)
        self.sigma_max = float(sigma_max)
        check_fdm_kernel_args(m, self.sigma_min, self.sigma_max, beta_min, beta_d)
        self.kernel = dict(m=m, beta_min=beta_min, beta_d=beta_d, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def sigma(self, timesteps: Union[int, torch.Tensor]) -> torch.Tensor:
        """``sigma_t`` of integer timesteps (float64)."""
        return self.sigmas[torch.as_tensor(timesteps, dtype=torch.long).cpu()]

    def scale_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The state scale: ``s(sigma)`` for FDM, ``1 / sqrt(1 + sigma^2)`` for the baseline (1 at sigma = 0)."""
        if self.input_scaling == "baseline":
            return 1.0 / (1.0 + sigma**2).sqrt()
        return fdm_scale(sigma, **self.kernel)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The network input at ``t``: ``s_t (x0 + sigma_t eps)``, per sample."""
        sigma = self.sigma(timesteps)
        scale = _per_sample(self.scale_of_sigma(sigma), original_samples)
        sigma = _per_sample(sigma, original_samples)
        return scale * (original_samples + sigma * noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (DDPM's, since the noise is DDPM's)."""
        abar = _per_sample(self.alphas_cumprod[torch.as_tensor(timesteps, dtype=torch.long).cpu()], sample)
        return abar.sqrt() * noise - (1 - abar).sqrt() * sample

    def denoised(
        self, model_output: torch.Tensor, z: torch.Tensor, sigma: float, prediction_type: str
    ) -> torch.Tensor:
        """The clean-data prediction ``D`` from the raw network output at normalised state ``z`` and noise ``sigma``."""
        if prediction_type == "epsilon":
            return z - sigma * model_output
        if prediction_type == "v_prediction":  # x0 = alpha x_ddpm - sigma_vp v with x_ddpm = alpha z
            abar = 1.0 / (1.0 + sigma**2)
            return abar * z - math.sqrt(1.0 - abar) * model_output
        if prediction_type == "sample":
            return model_output
        raise ValueError(
            f"`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction'], got {prediction_type!r}."
        )


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per sample (or a scalar) over ``like``'s trailing dimensions, in its dtype and device."""
    values = torch.as_tensor(values).to(device=like.device, dtype=like.dtype).flatten()
    return values.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class FDMSchedulerOutput(BaseOutput):
    """
    Output of the FDM schedulers' `step`.

    Args:
        prev_sample (`torch.Tensor`): The state at the next (less noisy) noise level: the next model input loop state.
        pred_original_sample (`torch.Tensor`): The clean-data prediction ``D`` of this step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class FDMVPSchedulerMixin:
    r"""
    The shared part of the discrete FDM schedulers (`FDMDDIMScheduler`, `FDMDPMSolverMultistepScheduler`): the
    `FDMVPProcess` built from the config, the inference grid, and the training-side methods. Each scheduler adds only
    its ``step``, which maps the normalised state ``z = y / s_t`` and the clean prediction ``D`` to the next ``z``.

    The scheduler's state IS the network input ``y_t = s_t (x0 + sigma_t eps)``: `scale_model_input` is the identity,
    so a loop that never calls it (`DDPMPipeline`) and one that does (`StableDiffusionPipeline`) feed the UNet the
    same tensor, and ``unet(add_noise(x0, eps, t), t)`` trains exactly the function the sampler evaluates.
    `DDPMPipeline` also ignores `init_noise_sigma` (the state's std ``k_t`` at the first timestep): that is right when
    the grid starts at ``T - 1`` (``k_{T-1} = 1`` by calibration; "trailing" and "linspace" spacings, and always
    with ``input_scaling="baseline"``); otherwise `step` refuses such a loop with a `ValueError`.

    `betas`, `alphas` and `alphas_cumprod` are DDPM's (the process keeps DDPM's SNR); `rescale_betas_zero_snr=True`
    is refused (an infinite ``sigma_{T-1}``).
    """

    order = 1
    # diffusers schedulers whose configs this scheduler reads with `from_config` (listed explicitly).
    _compatibles = [
        "DDIMScheduler",
        "DDPMScheduler",
        "PNDMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "LMSDiscreteScheduler",
        "HeunDiscreteScheduler",
        "UniPCMultistepScheduler",
    ]

    def _build_process(self) -> None:
        cfg = self.config
        if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction'], got {cfg.prediction_type!r}."
            )
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"`timestep_spacing` must be one of ['leading', 'linspace', 'trailing'], got {cfg.timestep_spacing!r}."
            )
        if cfg.rescale_betas_zero_snr:
            raise ValueError(
                "`rescale_betas_zero_snr=True` is not supported: zero terminal SNR makes sigma_{T-1} = "
                "sqrt((1 - abar) / abar) infinite, and the FDM state s_t (x0 + sigma_t eps) and its kernel need a finite "
                "sigma. Use diffusers' `DDIMScheduler` for zero-SNR models."
            )
        betas = vp_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas)
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.process = FDMVPProcess(
            abar, cfg.input_scaling, cfg.m, cfg.beta_min, cfg.beta_d, cfg.sigma_min, cfg.sigma_max, cfg.sigma_range
        )
        self.betas = betas.to(torch.float32)
        self.alphas = (1.0 - betas).to(torch.float32)
        self.alphas_cumprod = abar.to(torch.float32)
        self.num_inference_steps = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1)
        self._input_scaled = False
        self._reset()

    def _reset(self) -> None:
        """Per-trajectory state (none for one-step solvers)."""

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """
        Set the decreasing sampling timesteps (``timestep_spacing`` and ``steps_offset`` as in diffusers) and reset the
        per-trajectory state.

        Args:
            num_inference_steps (`int`): Number of steps, in ``[1, num_train_timesteps]``.
            device (`str` or `torch.device`, *optional*): Where to put `timesteps`.
        """
        self.timesteps = self._inference_timesteps(num_inference_steps).to(device)
        self.num_inference_steps = num_inference_steps
        self._input_scaled = False
        self._reset()

    @property
    def num_sampling_timesteps(self) -> int:
        """
        How many timesteps ``0 .. n - 1`` sampling may use: ``T``, or those with ``sigma_t <= max_sampling_sigma``
        (default 80 with ``sigma_range="authors"``: the authors' sampler never starts above sigma = 80).
        """
        cfg = self.config
        cap = cfg.max_sampling_sigma
        if cap is None and cfg.sigma_range == "authors":
            cap = FDM_SAMPLER_SIGMA_RANGES["vp"][1]
        if cap is None:
            return cfg.num_train_timesteps
        n = int((self.process.sigmas <= cap).sum())
        if n < 2:
            raise ValueError(
                f"`max_sampling_sigma`={cap} leaves fewer than 2 timesteps (sigma_1 = {self.process.sigmas[1]:.4g})."
            )
        return n

    def _inference_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        cfg = self.config
        return vp_inference_timesteps(
            self.num_sampling_timesteps, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset
        )

    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial state at the first sampling timestep: ``k_t = s_t sqrt(1 + sigma_t^2)`` (1 by default)."""
        sigma = self.process.sigma(self.timesteps[0])
        return float(self.process.scale_of_sigma(sigma) * (1 + sigma**2).sqrt())

    def scale_model_input(self, sample: torch.Tensor, timestep: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        """The identity: the state is already the network input (see the class docstring)."""
        self._input_scaled = True
        return sample

    def _check_unscaled_start(self, timestep: int) -> None:
        """
        Refuse a loop that starts from unit-variance noise without `scale_model_input` (`DDPMPipeline` ignores
        `init_noise_sigma`) when the state at the first timestep is not unit-scale (``|k_t - 1| > 0.01``).
        """
        if self._input_scaled or timestep != int(self.timesteps[0]):
            return
        k = self.init_noise_sigma
        if abs(k - 1.0) > 0.01:
            raise ValueError(
                f"{type(self).__name__}.step: this loop never called `scale_model_input` and so, like `DDPMPipeline`, "
                f"starts from N(0, I) and ignores `init_noise_sigma`, but the state at the first timestep {timestep} "
                f"has std {k:.3g} (timestep_spacing={self.config.timestep_spacing!r}). Use "
                "timestep_spacing='trailing' or 'linspace' (the first timestep is T - 1, where the state has unit "
                "scale), or a loop that starts from `init_noise_sigma * noise` and calls `scale_model_input`."
            )

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Union[int, torch.Tensor]
    ) -> torch.Tensor:
        r"""
        The training-time forward process: EXACTLY the network input at ``t``, ``s_t (x0 + sigma_t eps)`` with
        ``sigma_t = sqrt((1 - abar_t) / abar_t)``; with ``input_scaling="baseline"`` it is DDPM's
        ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. The eps target is ``noise`` itself; the v target is
        `get_velocity`; the ``"sample"`` target is ``x0``.

        Args:
            original_samples (`torch.Tensor`): Clean samples ``x0``, batch first.
            noise (`torch.Tensor`): ``eps ~ N(0, I)``, same shape.
            timesteps (`int` or `torch.Tensor`): Integer timesteps, one per sample (or one for all).
        """
        return self.process.add_noise(original_samples, noise, timesteps)

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: Union[int, torch.Tensor]
    ) -> torch.Tensor:
        r"""
        The v-prediction training target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (``sample`` is ``x0``). It is
        DDPM's target, because FDM keeps DDPM's noise and SNR.
        """
        return self.process.get_velocity(sample, noise, timesteps)

    def _sigma_after(self, timestep: int) -> float:
        """The noise level the step from ``timestep`` goes to: the next grid timestep's sigma, or the final one."""
        matches = (self.timesteps.cpu() == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(f"`timestep` {timestep} is not in the scheduler's timesteps; call `set_timesteps` first.")
        i = int(matches[0])
        if i + 1 < len(self.timesteps):
            return float(self.process.sigma(self.timesteps[i + 1]))
        return self._final_sigma()

    def _final_sigma(self) -> float:
        return 0.0

    def _normalise(self, model_output: torch.Tensor, timestep, sample: torch.Tensor):
        """``(z, D, sigma, sigma_next)`` for a step from ``timestep``."""
        t = int(timestep)
        self._check_unscaled_start(t)
        sigma = self.process.sigma(t)
        z = sample / float(self.process.scale_of_sigma(sigma))
        sigma = float(sigma)
        denoised = self.process.denoised(model_output.to(z.dtype), z, sigma, self.config.prediction_type)
        return z, denoised, sigma, self._sigma_after(t)

    def _output(self, z_next: torch.Tensor, sigma_next: float, denoised: torch.Tensor, sample, return_dict: bool):
        scale = float(self.process.scale_of_sigma(torch.tensor(sigma_next, dtype=torch.float64)))
        prev_sample = (scale * z_next).to(sample.dtype)
        denoised = denoised.to(sample.dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return FDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

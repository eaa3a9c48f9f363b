"""Sigma-space FDM scheduler: EDM preconditioning with FDM's ``c_in``, Karras sigmas, Euler / Heun (EDM Algorithm 1)."""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .fdm import (
    FDM_PAPER_M,
    FDM_SAMPLER_SIGMA_RANGES,
    FDM_SIGMA_RANGES,
    FDMSchedulerOutput,
    _per_sample,
    check_fdm_kernel_args,
    check_variant,
    fdm_scale,
)


def _as_sigma(sigma: Union[float, torch.Tensor]) -> torch.Tensor:
    sigma = torch.as_tensor(sigma)
    return sigma if sigma.is_floating_point() else sigma.to(torch.get_default_dtype())


class FDMEDMScheduler(SchedulerMixin, ConfigMixin):
    r"""
    FDM in sigma space (EDM-FDM, VP-FDM, VE-FDM), with the contract of diffusers' `EDMEulerScheduler`.

    The state is ``x = x0 + sigma * eps`` and the denoiser is ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``
    with the raw network ``F``. FDM only replaces the input scaling, ``c_in = s(sigma)`` (see `fdm_scale`); the
    variant's ``c_skip``, ``c_out`` and loss weight are kept (EDM paper, Table 1):

    | variant | c_skip | c_out | baseline c_in | loss weight |
    |---|---|---|---|---|
    | "edm" | sd^2 / (sigma^2 + sd^2) | sigma sd / sqrt(sigma^2 + sd^2) | 1 / sqrt(sigma^2 + sd^2) | (sigma^2 + sd^2) / (sigma sd)^2 |
    | "vp"  | 1 | -sigma | 1 / sqrt(sigma^2 + 1) | 1 / sigma^2 |
    | "ve"  | 1 | sigma | 1 | 1 / sigma^2 |

    (``sd = sigma_data``.) Sampling integrates the probability-flow ODE ``dx / dsigma = (x - D) / sigma`` on the Karras
    grid ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` then 0, with Euler
    or Heun (2nd-order correction on every step but the last, EDM Algorithm 1). A Heun step needs two model calls:
    as in diffusers' `HeunDiscreteScheduler`, `timesteps` repeats every interior sigma and `state_in_first_order`
    tells which half comes next, so the stock ``scale_model_input -> model -> step`` loop works (``2 N - 1`` NFE), and
    `order` is 2 so that img2img / inpaint pipelines start from the first-order slot of the right sigma (the same model
    calls as `HeunDiscreteScheduler`).

    Stock-pipeline contract: `add_noise` takes timesteps (values of `timesteps`, as img2img / inpaint pass) and maps
    them to sigma with `timestep_to_sigma`; training code that draws sigma passes ``sigmas=`` instead. A loop must
    start from ``init_noise_sigma * noise`` and call `scale_model_input` before `step`: `step` refuses a loop that
    never does (`DDPMPipeline`), since its model would see the unpreconditioned state.

    Args:
        sigma_min (`float`, *optional*), sigma_max (`float`, defaults to 80.0):
            The sampling range of the Karras grid (and the range of `noise_conditioning="index"`). ``sigma_min``
            defaults to the authors' per variant (`FDM_SAMPLER_SIGMA_RANGES`: 0.02 for "ve", 0.002 otherwise).
        sigma_data (`float`, defaults to 0.5): Std of the data (EDM preconditioning).
        rho (`float`, defaults to 7.0): Karras grid exponent.
        variant (`"edm"`, `"vp"` or `"ve"`, defaults to `"edm"`): The parametrisation (table above); it also picks
            the kernel's default sigma range (`FDM_SIGMA_RANGES`: vp 0.001 .. 152.17, ve 0.02 .. 100, edm 0.002 .. 80).
        m (`float`, *optional*), beta_min (`float`, defaults to 0.1), beta_d (`float`, defaults to 19.9):
            The FDM kernel (`fdm_scale`). ``m`` defaults to the published results' (`FDM_PAPER_M`: 1.0 for "ve",
            whose network in the authors' code ignores ``m``; 2.0 otherwise); an explicit ``m`` is respected in every
            variant, e.g. ``m=2.0`` for VE as the authors' script meant it.
        input_scaling (`"fdm"` or `"baseline"`, defaults to `"fdm"`):
            ``c_in = s(sigma)`` or the variant's usual ``c_in``: one class gives both for same-run comparisons.
        solver (`"euler"` or `"heun"`, defaults to `"heun"`): The ODE solver.
        num_train_timesteps (`int`, defaults to 1000): ``T`` for `noise_conditioning="index"`.
        noise_conditioning (`"edm"` or `"index"`, defaults to `"edm"`):
            The `timestep` the network gets (``c_noise``): ``0.25 ln sigma`` (EDM, diffusers), or the fractional
            training timestep ``t = (T - 1) (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min)`` in
            ``[0, T - 1]``, for a diffusers UNet's sinusoidal embedding and for routing with a `TimestepStages`
            over ``[0, T)``: stage ``k`` is then a range of ``ln sigma``.
        kernel_sigma_min (`float`, *optional*), kernel_sigma_max (`float`, *optional*):
            The sigma range of FDM's ``tau``; default: the variant's row of `FDM_SIGMA_RANGES`.
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]

    @register_to_config
    def __init__(
        self,
        sigma_min: float | None = None,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        variant: Literal["vp", "ve", "edm"] = "edm",
        m: float | None = None,
        beta_min: float = 0.1,
        beta_d: float = 19.9,
        input_scaling: Literal["fdm", "baseline"] = "fdm",
        solver: Literal["euler", "heun"] = "heun",
        num_train_timesteps: int = 1000,
        noise_conditioning: Literal["edm", "index"] = "edm",
        kernel_sigma_min: float | None = None,
        kernel_sigma_max: float | None = None,
    ):
        check_variant(variant)
        if sigma_min is None or m is None:  # the paper's per-variant values, stored in the config
            sigma_min = FDM_SAMPLER_SIGMA_RANGES[variant][0] if sigma_min is None else sigma_min
            m = FDM_PAPER_M[variant] if m is None else m
            self.register_to_config(sigma_min=sigma_min, m=m)
        choices = {
            "input_scaling": ("baseline", "fdm"),
            "solver": ("euler", "heun"),
            "noise_conditioning": ("edm", "index"),
        }
        for name, accepted in choices.items():
            if locals()[name] not in accepted:
                raise ValueError(f"`{name}` must be one of {list(accepted)}, got {locals()[name]!r}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"`sigma_min` must satisfy 0 < sigma_min < sigma_max, got {sigma_min!r} and {sigma_max!r}."
            )
        for name, value in (("sigma_data", sigma_data), ("rho", rho)):
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}.")
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be an int >= 2, got {num_train_timesteps!r}.")
        default_min, default_max = FDM_SIGMA_RANGES[variant]
        self.kernel = dict(
            m=m,
            beta_min=beta_min,
            beta_d=beta_d,
            sigma_min=default_min if kernel_sigma_min is None else kernel_sigma_min,
            sigma_max=default_max if kernel_sigma_max is None else kernel_sigma_max,
        )
        check_fdm_kernel_args(**self.kernel)
        self.order = 2 if solver == "heun" else 1
        self._begin_index = None
        self.set_timesteps(num_train_timesteps)

    # ------------------------------------------------------------------ preconditioning (training and sampling)
    def c_in(self, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """The input scaling: ``s(sigma)`` (FDM) or the variant's baseline ``c_in``."""
        sigma = _as_sigma(sigma)
        if self.config.input_scaling == "fdm":
            return fdm_scale(sigma, **self.kernel)
        if self.config.variant == "edm":
            return 1.0 / (sigma**2 + self.config.sigma_data**2).sqrt()
        if self.config.variant == "vp":
            return 1.0 / (sigma**2 + 1.0).sqrt()
        return torch.ones_like(sigma)

    def precondition_inputs(self, sample: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """The network input ``c_in(sigma) * x`` (``sigma``: a scalar or one per sample)."""
        return _per_sample(self.c_in(sigma), sample) * sample

    def precondition_noise(self, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """
        ``c_noise``, the `timestep` the network is called with: ``0.25 ln sigma`` (`noise_conditioning="edm"`) or
        ``(T - 1) (ln sigma - ln sigma_min) / (ln sigma_max - ln sigma_min)`` (`"index"`).
        """
        log_sigma = _as_sigma(sigma).log()
        if self.config.noise_conditioning == "edm":
            return 0.25 * log_sigma
        lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
        return (self.config.num_train_timesteps - 1) * (log_sigma - lo) / (hi - lo)

    def sigma_to_timestep(self, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """Alias of `precondition_noise`."""
        return self.precondition_noise(sigma)

    def timestep_to_sigma(self, timestep: Union[float, torch.Tensor]) -> torch.Tensor:
        """The inverse of `precondition_noise`."""
        t = _as_sigma(timestep)
        if self.config.noise_conditioning == "edm":
            return (4.0 * t).exp()
        lo, hi = math.log(self.config.sigma_min), math.log(self.config.sigma_max)
        return (lo + t / (self.config.num_train_timesteps - 1) * (hi - lo)).exp()

    def _c_skip_c_out(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = self.config.sigma_data
        if self.config.variant == "edm":
            return sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return torch.ones_like(sigma), -sigma if self.config.variant == "vp" else sigma

    def precondition_outputs(
        self, sample: torch.Tensor, model_output: torch.Tensor, sigma: Union[float, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser ``D = c_skip(sigma) x + c_out(sigma) F`` from the state ``x`` and the raw output ``F``."""
        c_skip, c_out = self._c_skip_c_out(_as_sigma(sigma))
        return _per_sample(c_skip, sample) * sample + _per_sample(c_out, sample) * model_output

    def loss_weight(self, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        r"""
        The per-sample loss weight ``lambda(sigma)`` of ``lambda |D(x; sigma) - x0|^2``: EDM's
        ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` for `variant="edm"`, ``1 / sigma^2`` for "vp" and "ve".
        Clamp it with `FDMLossWarmup` (part of FDM).
        """
        sigma = _as_sigma(sigma)
        if self.config.variant == "edm":
            sd = self.config.sigma_data
            return (sigma**2 + sd**2) / (sigma * sd) ** 2
        return 1.0 / sigma**2

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: Union[float, torch.Tensor, None] = None,
        *,
        sigmas: Union[float, torch.Tensor, None] = None,
    ) -> torch.Tensor:
        r"""
        The forward process ``x = x0 + sigma * noise`` (the network input is ``precondition_inputs(x, sigma)``).

        As in diffusers' sigma-space schedulers, the third argument is a timestep (``c_noise``), e.g. an element of
        `timesteps` passed by `StableDiffusionImg2ImgPipeline` / `StableDiffusionInpaintPipeline`; it is mapped to
        ``sigma = timestep_to_sigma(timesteps)`` (the exact inverse of `precondition_noise`, so it also holds for
        timesteps between the grid's). Training code that draws sigma itself (EDM's log-normal) passes ``sigmas=``.

        Args:
            original_samples (`torch.Tensor`): Clean samples ``x0``, batch first.
            noise (`torch.Tensor`): ``eps ~ N(0, I)``, same shape.
            timesteps (`float` or `torch.Tensor`, *optional*): One timestep per sample (or one for all).
            sigmas (`float` or `torch.Tensor`, *optional*, keyword only): One noise level per sample (or one for all),
                instead of `timesteps`.

        Returns:
            `torch.Tensor`: ``x0 + sigma * noise``.
        """
        if (timesteps is None) == (sigmas is None):
            raise ValueError(
                "Pass exactly one of `timesteps` (values of `scheduler.timesteps`, as stock pipelines do) and "
                "`sigmas` (keyword: noise levels, for training code)."
            )
        sigma = self.timestep_to_sigma(timesteps) if sigmas is None else _as_sigma(sigmas)
        return original_samples + _per_sample(sigma, original_samples) * noise

    # ------------------------------------------------------------------ sampling
    @property
    def init_noise_sigma(self) -> float:
        """Std of the initial noise: the first sigma of the grid (``sigma_max``)."""
        return float(self.sigmas[0])

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next `step` is the first (Euler) half of a step, rather than a Heun correction."""
        return self._prev_derivative is None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at position ``begin_index`` of `timesteps` (set by img2img-style pipelines)."""
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """
        Build the Karras grid of ``num_inference_steps`` sigmas (then 0) and reset the per-trajectory state. With the
        Heun solver, `timesteps` has ``2 N - 1`` entries (interior sigmas repeated).

        Args:
            num_inference_steps (`int`): ``N >= 1``.
            device (`str` or `torch.device`, *optional*): Where to put `timesteps`.
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        cfg = self.config
        ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
        lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
        sigmas = (hi + ramp * (lo - hi)) ** cfg.rho
        if cfg.solver == "heun":
            # s0, s1, s1, ..., s_{N-1}, s_{N-1}: the repeat is the Heun correction of the step into that sigma; the
            # final step from s_{N-1} to 0 is a plain Euler step
            sigmas = torch.cat([sigmas[:1], sigmas[1:].repeat_interleave(2)])
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)
        self.timesteps = self.precondition_noise(self.sigmas[:-1]).to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None
        self._prev_derivative = None
        self._prev_sample = None
        self._input_scaled = False

    def index_for_timestep(self, timestep: Union[float, torch.Tensor]) -> int:
        """Position of ``timestep`` in `timesteps` (for a repeated Heun timestep, the first-order slot)."""
        indices = (self.timesteps.cpu() == torch.as_tensor(timestep).cpu()).nonzero()
        if len(indices) == 0:
            raise ValueError(f"`timestep` {timestep} is not in the scheduler's timesteps; call `set_timesteps` first.")
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor]) -> torch.Tensor:
        """The network input at the current position: ``precondition_inputs(sample, sigma)``."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self._input_scaled = True
        return self.precondition_inputs(sample, self.sigmas[self._step_index])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Union[FDMSchedulerOutput, tuple]:
        """
        Advance the ODE by one half (Heun) or one full (Euler) step with the RAW network output at ``sample``.

        First order: ``d = (x - D) / sigma_i``, ``x' = x + (sigma_{i+1} - sigma_i) d``. Heun correction (called with
        the model evaluated at ``x'``): ``x_{i+1} = x + (sigma_{i+1} - sigma_i) (d + d') / 2``.

        Args:
            model_output (`torch.Tensor`): ``F`` evaluated at ``scale_model_input(sample, timestep)``.
            timestep (`float` or `torch.Tensor`): The current element of `timesteps`.
            sample (`torch.Tensor`): The current state ``x``.
            generator (`torch.Generator`, *optional*): Unused (deterministic ODE); accepted for pipelines.
            return_dict (`bool`, defaults to `True`): Return an `FDMSchedulerOutput` or a tuple.

        Returns:
            `FDMSchedulerOutput` or `tuple`: ``(prev_sample, pred_original_sample)``.

        Raises:
            `ValueError`: if `scale_model_input` was never called since `set_timesteps` (a loop such as
                `DDPMPipeline`'s, which feeds the raw state to the model and starts from unit-variance noise).
        """
        if not self._input_scaled:
            raise ValueError(
                f"{type(self).__name__}.step was called without `scale_model_input`: the model must see "
                "`scale_model_input(sample, t)` and the loop must start from `init_noise_sigma * noise`. Pipelines "
                "that do neither (`DDPMPipeline`) cannot serve a sigma-space scheduler; use `StageAwareImagePipeline` "
                "or a loop `x = step(model(scale_model_input(x, t), t), t, x)`."
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = float(self.sigmas[i])
        model_output = model_output.to(sample.dtype)
        denoised = self.precondition_outputs(sample, model_output, sigma)
        derivative = (sample - denoised) / sigma
        if self.state_in_first_order:
            sigma_next = float(self.sigmas[i + 1])
            prev_sample = sample + (sigma_next - sigma) * derivative
            if self.config.solver == "heun" and sigma_next > 0:
                self._prev_derivative, self._prev_sample, self._dt = derivative, sample, sigma_next - sigma
        else:
            prev_sample = self._prev_sample + self._dt * 0.5 * (self._prev_derivative + derivative)
            self._prev_derivative = self._prev_sample = None
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return FDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

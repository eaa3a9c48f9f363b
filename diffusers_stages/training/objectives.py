"""Training objectives: how noise levels are drawn (optionally inside one stage) and the per-sample loss.

`DiscreteObjective`: DDPM-style, ``t ~ U{0, ..., T-1}``, ``x_t = scheduler.add_noise(x0, eps, t)`` (for an FDM scheduler
this already is the network input), target ``eps`` / ``v`` / ``x0``; with FDM's warm-up the per-sample loss is scaled
by ``min(1, c / lambda_t)``, ``lambda_t`` the clean-image weight the target implies (eps: ``min(1, c sigma_t^2)``).

`EDMObjective`: the sigma-space objectives of EDM's Table 1 (EDM, VP, VE), ``sigma`` from the variant's distribution
(`noise_levels`), ``x = x0 + sigma eps``, ``D(x) = c_skip x + c_out F(c_in x, c_noise)``, loss
``lambda(sigma) |D(x) - x0|^2`` with the scheduler's ``lambda`` (EDM: ``(sigma^2 + sigma_data^2) / (sigma
sigma_data)^2``; VP, VE: ``1 / sigma^2``); FDM replaces ``c_in`` (the scheduler's business) and clamps ``lambda`` with
its warm-up.

Both share one interface, which the trainer, DeMe's step (`deme.losses`) and its merge search use: ``sample_levels``
(a batch of levels, optionally inside a stage), ``levels_at`` (levels at quantiles of the training distribution),
``noisy`` (the noisy input), ``predict`` (what the loss compares: the network output, or EDM's denoiser ``D``),
``target`` and ``loss_weight``; ``loss`` is `weighted_loss` of these parts.

Stages: a `TimestepStages` over the training grid ``[0, T)``. Drawing "inside stage k" restricts the base
distribution to the stage (uniform in t for DDPM; the log-normal truncated to the stage's log-sigma range for EDM,
with stage 0 open downwards and the last stage open upwards, so the stages partition the base distribution exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..stages import TimestepStages
from .noise_levels import LogNormalSigma


def _model_output(model, x, t, model_kwargs):
    out = model(x, t, **model_kwargs)
    return out.sample if hasattr(out, "sample") else out[0]


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float(), reduction="none").flatten(1).mean(1)


class DiscreteObjective:
    r"""
    DDPM-style objective over the integer training timesteps of a diffusers (or FDM) scheduler.

    Args:
        scheduler: provides ``add_noise``, ``get_velocity``, ``alphas_cumprod`` and its config.
        prediction_type (`str`, *optional*): ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; default: the
            scheduler's.
        warmup: an ``FDMLossWarmup``, or ``None`` for none (FDM's warm-up for the discrete path; see `loss_weight`).
    """

    def __init__(self, scheduler, prediction_type: str | None = None, warmup=None):
        self.scheduler, self.warmup = scheduler, warmup
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"`prediction_type` must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}."
            )
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def stage_weights(self, stages: TimestepStages) -> torch.Tensor:
        """Probability of each stage under the base distribution: its share of the timesteps."""
        edges = torch.tensor(stages.edges, dtype=torch.float64)
        return (edges[1:] - edges[:-1]) / self.num_train_timesteps

    def sample_levels(
        self, stages: TimestepStages, stage: int | None, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Integer timesteps: uniform over ``[0, T)``, or inside ``stage`` when given."""
        if stage is None:
            return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)
        return stages.sample_timesteps(stage, batch_size, generator=generator)

    def timesteps(self, levels: torch.Tensor) -> torch.Tensor:
        """The model's conditioning for the sampled levels (the timesteps themselves)."""
        return levels

    def stage_of(self, stages: TimestepStages, levels: torch.Tensor) -> torch.Tensor:
        return stages.stage_index(levels)

    def clean_image_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        r"""
        ``lambda_t``, the weight on ``|D - x0|^2`` that the unweighted target loss equals: with
        ``sigma_t^2 = (1 - abar_t) / abar_t``, ``1 / sigma_t^2`` (eps), ``(1 + sigma_t^2) / sigma_t^2`` (v), 1 (x0).
        """
        abar = self.scheduler.alphas_cumprod.to(torch.float64)[timesteps.long().cpu()]
        sigma2 = (1 - abar) / abar
        if self.prediction_type == "epsilon":
            return 1 / sigma2
        if self.prediction_type == "v_prediction":
            return (1 + sigma2) / sigma2
        return torch.ones_like(sigma2)

    def loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        r"""
        FDM's warm-up on the discrete path: the clean-image weight ``lambda_t`` is clamped to ``c`` as in the authors'
        sigma-space losses, i.e. the target loss is scaled by ``min(lambda_t, c) / lambda_t = min(1, c / lambda_t)``;
        for eps-prediction ``min(1, c sigma_t^2)`` (the authors' VP-FDM warm-up in eps terms). 1 without a warm-up
        or once it has finished.
        """
        if self.warmup is None:
            return torch.ones(timesteps.shape, dtype=torch.float32)
        lam = self.clean_image_weight(timesteps)
        return (self.warmup(lam) / lam).float()

    def levels_at(self, u: torch.Tensor) -> torch.Tensor:
        """The timesteps at quantiles ``u`` in ``[0, 1)`` of the uniform training distribution: ``floor(u T)``."""
        return (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``x_t = scheduler.add_noise(x0, eps, t)`` (for DDPM ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``)."""
        return self.scheduler.add_noise(x0, noise, levels.to(x0.device))

    def predict(self, model, x: torch.Tensor, levels: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """The network output ``F(x_t, t)`` (what the loss compares with `target`)."""
        return _model_output(model, x, levels.to(x.device), model_kwargs)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The regression target: ``eps``, ``v`` or ``x0`` by ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, levels.to(x0.device))
        return x0

    def loss(self, model, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """``loss_weight(t) |F(x_t, t) - target|^2`` per sample (mean over the other dimensions)."""
        return weighted_loss(self, model, x0, noise, levels, **model_kwargs)


class EDMObjective:
    r"""
    Sigma-space objective (EDM's Table 1: EDM, VP or VE) over an ``FDMEDMScheduler``, whose ``variant`` gives the
    preconditioning and ``lambda(sigma)``.

    Args:
        scheduler: provides ``precondition_inputs``, ``precondition_noise``, ``precondition_outputs``,
            ``loss_weight`` and the ``timestep_to_sigma`` map of its training grid (for stages).
        distribution: the training distribution of sigma, with ``cdf(ln sigma)`` and ``icdf(u)`` (`noise_levels`:
            `LogNormalSigma` for EDM, `VPSigma`, `LogUniformSigma` for VE); default EDM's log-normal (-1.2, 1.2).
        warmup: an ``FDMLossWarmup`` that clamps ``lambda(sigma)``; ``None`` for no clamp.
    """

    def __init__(self, scheduler, distribution=None, warmup=None):
        self.scheduler = scheduler
        self.distribution = distribution if distribution is not None else LogNormalSigma()
        self.warmup = warmup
        self.num_train_timesteps = int(getattr(scheduler.config, "num_train_timesteps", 1000))

    def _log_sigma_edges(self, stages: TimestepStages) -> torch.Tensor:
        inner = [float(self.scheduler.timestep_to_sigma(torch.tensor(float(b)))) for b in stages.boundaries]
        logs = torch.tensor(inner, dtype=torch.float64).log()
        return torch.cat([torch.tensor([-torch.inf]), logs, torch.tensor([torch.inf])]).double()

    def stage_weights(self, stages: TimestepStages) -> torch.Tensor:
        """Probability of each stage under the sigma distribution: ``CDF(b_k) - CDF(a_k)`` over its log-sigma range."""
        cdf = self.distribution.cdf(self._log_sigma_edges(stages))
        return cdf[1:] - cdf[:-1]

    def sample_levels(
        self, stages: TimestepStages, stage: int | None, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Sigmas from the distribution, truncated to ``stage``'s log-sigma range when given (inverse CDF)."""
        lo, hi = 0.0, 1.0
        if stage is not None:
            cdf = self.distribution.cdf(self._log_sigma_edges(stages))
            lo, hi = float(cdf[stage]), float(cdf[stage + 1])
        return self.levels_at(lo + (hi - lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64))

    def levels_at(self, u: torch.Tensor) -> torch.Tensor:
        """The sigmas at quantiles ``u`` in ``[0, 1)`` of the training distribution: ``icdf(u)`` (float32)."""
        return self.distribution.icdf(u.double().clamp(1e-12, 1 - 1e-12)).float()

    def timesteps(self, levels: torch.Tensor) -> torch.Tensor:
        return self.scheduler.precondition_noise(levels)

    def stage_of(self, stages: TimestepStages, levels: torch.Tensor) -> torch.Tensor:
        edges = self._log_sigma_edges(stages)[1:-1].float()
        return torch.bucketize(levels.log(), edges, right=True)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """The scheduler's ``lambda(sigma)`` (EDM: ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``; VP, VE:
        ``1 / sigma^2``), clamped by the warm-up."""
        weight = self.scheduler.loss_weight(sigma)
        return self.warmup(weight) if self.warmup is not None else weight

    @staticmethod
    def _sigma(levels: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = levels.to(like.device, torch.float32)
        return sigma, sigma.view(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``x = x0 + sigma eps``."""
        return x0 + self._sigma(levels, x0)[1] * noise

    def predict(self, model, x: torch.Tensor, levels: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """The denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise(sigma))`` (the scheduler's
        preconditioning; FDM's ``c_in`` for an FDM scheduler)."""
        sigma, s = self._sigma(levels, x)
        model_in = self.scheduler.precondition_inputs(x, s)
        pred = _model_output(model, model_in, self.scheduler.precondition_noise(sigma), model_kwargs)
        return self.scheduler.precondition_outputs(x, pred, s)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """The clean image ``x0``, the denoiser's target."""
        return x0

    def loss(self, model, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """``lambda(sigma) |D(x0 + sigma eps; sigma) - x0|^2`` per sample (mean over the other dimensions)."""
        return weighted_loss(self, model, x0, noise, levels.float(), **model_kwargs)


def weighted_loss(objective, model, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, **model_kwargs):
    r"""
    The per-sample loss of an objective from its parts (the interface DeMe also uses): ``w(l) |P(noisy(x0, eps, l),
    l) - target(x0, eps, l)|^2`` with ``w = objective.loss_weight``, ``P = objective.predict``, the mean over all but
    the batch dimension.

    Args:
        objective (`DiscreteObjective` or `EDMObjective`): Provides ``noisy``, ``predict``, ``target`` and
            ``loss_weight``.
        model: The network; x0, noise, levels: clean samples, their noise and their noise levels (timesteps or sigmas).
    """
    x = objective.noisy(x0, noise, levels)
    pred = objective.predict(model, x, levels, **model_kwargs)
    weight = objective.loss_weight(levels).to(x0.device)
    return weight * _per_sample_mse(pred, objective.target(x0, noise, levels))

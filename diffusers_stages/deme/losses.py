"""Decouple-then-Merge (DeMe) finetuning techniques: consistency loss, probabilistic sampling, channel projection.

One training step of one stage (`deme_training_step`) is shared by ``training/train_stage_lora.py`` and the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..stages import TimestepStages
from ..training.components import objective_for_scheduler
from ..training.objectives import DiscreteObjective


def check_prob_sampling(prob_sampling: float) -> None:
    """DeMe's probabilistic-sampling probability ``p`` must lie in ``[0, 1]``."""
    if not 0.0 <= prob_sampling <= 1.0:
        raise ValueError(f"`prob_sampling` must be in [0, 1], got {prob_sampling}.")


def sample_deme_levels(
    objective,
    stages: TimestepStages,
    stage: int,
    batch_size: int,
    prob_sampling: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    DeMe's probabilistic sampling: each noise level is drawn from the objective's whole training distribution with
    probability ``p``, else from its restriction to ``stage`` (uniform timesteps of the stage for the discrete
    objective; the sigma distribution truncated to the stage's log-sigma range for a sigma-space one).

    Args:
        objective (`DiscreteObjective` or `EDMObjective`): Draws the levels (``sample_levels``).
        stages (`TimestepStages`): The stages.
        stage (`int`): The stage being finetuned.
        batch_size (`int`): Number of levels.
        prob_sampling (`float`, defaults to 0.0): ``p`` in ``[0, 1]`` (the authors' script uses 0.3).
        generator (`torch.Generator`, *optional*): CPU generator for reproducible draws.
    """
    check_prob_sampling(prob_sampling)
    levels = objective.sample_levels(stages, stage, batch_size, generator)
    if prob_sampling > 0:
        anywhere = objective.sample_levels(stages, None, batch_size, generator)
        pick = torch.rand(batch_size, generator=generator) < prob_sampling
        levels = torch.where(pick, anywhere, levels)
    return levels


def sample_deme_timesteps(
    stages: TimestepStages,
    stage: int,
    batch_size: int,
    prob_sampling: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    `sample_deme_levels` over integer timesteps: each timestep is drawn uniformly from all of ``[0, T)`` with
    probability ``p``, else uniformly from ``stage``'s range (the arguments as there).
    """
    objective = DiscreteObjective(DDPMScheduler(num_train_timesteps=stages.num_train_timesteps))
    return sample_deme_levels(objective, stages, stage, batch_size, prob_sampling, generator)


def sample_antithetic_timesteps(
    stages: TimestepStages,
    stage: int,
    batch_size: int,
    prob_sampling: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    The DeMe authors' timestep draw (``train_unconditional_deme.py``): with probability ``p`` the WHOLE batch comes
    from ``[lo, hi) = [0, T)``, else from the stage's range ``[lo, hi)``; ``n = B // 2 + 1`` timesteps ``t_i`` are
    drawn uniformly and paired with their mirror images ``lo + hi - 1 - t_i``, and the batch is the first ``B`` of
    ``[t_1, ..., t_n, lo + hi - 1 - t_1, ..., lo + hi - 1 - t_n]`` (so, as in their code, the last draws of an even
    batch stay unpaired).

    Args:
        stages (`TimestepStages`): The stages.
        stage (`int`): The stage being finetuned.
        batch_size (`int`): ``B``.
        prob_sampling (`float`, defaults to 0.0): ``p`` in ``[0, 1]`` (the authors' ``kd_global_ratio``, 0.3).
        generator (`torch.Generator`, *optional*): CPU generator for reproducible draws.
    """
    check_prob_sampling(prob_sampling)
    anywhere = bool(torch.rand((), generator=generator) < prob_sampling)
    lo, hi = (0, stages.num_train_timesteps) if anywhere else stages.timestep_range(stage)
    t = torch.randint(lo, hi, (batch_size // 2 + 1,), generator=generator)
    return torch.cat([t, lo + hi - 1 - t])[:batch_size]


@dataclass
class DeMeLossOutput(BaseOutput):
    """
    Args:
        loss (`torch.Tensor`): The total loss, ``denoising_loss + consistency_weight * consistency_loss``.
        denoising_loss (`torch.Tensor`): ``|target - pred|^2`` (mean).
        consistency_loss (`torch.Tensor`): ``|teacher - pred|^2`` (mean); zero when the term is off.
        timesteps (`torch.Tensor`, *optional*): The noise levels of the samples (`deme_training_step`): timesteps, or
            sigmas for a sigma-space base.
    """

    loss: torch.Tensor
    denoising_loss: torch.Tensor
    consistency_loss: torch.Tensor
    timesteps: torch.Tensor | None = None


def deme_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    teacher_pred: torch.Tensor | None = None,
    consistency_weight: float = 1.0,
    weight: torch.Tensor | None = None,
) -> DeMeLossOutput:
    r"""
    DeMe's finetuning loss ``|eps - eps_i(x_t, t)|^2 + lambda |eps_theta(x_t, t) - eps_i(x_t, t)|^2`` (``lambda = 1``
    in the paper): the denoising loss of the stage model ``eps_i`` plus a consistency term that keeps it close to the
    frozen pretrained model ``eps_theta``. With a per-sample ``weight`` ``w`` both terms are weighted by it (sigma
    space: ``lambda(sigma) |D_i - x0|^2 + lambda lambda(sigma) |D_i - D_theta|^2``).

    Args:
        model_pred (`torch.Tensor`): ``eps_i(x_t, t)`` (or the v / x0 prediction the scheduler trains, or ``D_i``).
        target (`torch.Tensor`): The regression target (``eps`` for epsilon prediction, ``x0`` in sigma space).
        teacher_pred (`torch.Tensor`, *optional*): ``eps_theta(x_t, t)`` of the pretrained model; no term when `None`.
        consistency_weight (`float`, defaults to 1.0): ``lambda``.
        weight (`torch.Tensor`, *optional*): ``w``, one per sample; default 1.
    """
    pred = model_pred.float()
    denoising = _weighted_mse(pred, target, weight)
    consistency = (
        _weighted_mse(pred, teacher_pred, weight) if teacher_pred is not None else torch.zeros_like(denoising)
    )
    return DeMeLossOutput(denoising + consistency_weight * consistency, denoising, consistency)


def _weighted_mse(pred: torch.Tensor, other: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``mean(w |pred - other|^2)`` with ``w`` broadcast per sample (plain MSE without ``weight``)."""
    if weight is None:
        return F.mse_loss(pred, other.float())
    w = weight.to(pred.device, torch.float32).view(-1, *([1] * (pred.ndim - 1)))
    return (w * F.mse_loss(pred, other.float(), reduction="none")).mean()


def deme_training_step(
    model: Callable,
    adapters,
    scheduler,
    x0: torch.Tensor,
    stage: int,
    generator: torch.Generator,
    encoder_hidden_states: torch.Tensor | None = None,
    prob_sampling: float = 0.0,
    consistency_loss: bool = False,
    consistency_weight: float = 1.0,
    antithetic_timesteps: bool = False,
    teacher: Callable | None = None,
    noise_generators: list[torch.Generator] | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> DeMeLossOutput:
    r"""
    The loss of one DeMe step for one stage under the base's own objective (`objective_for_scheduler`): draw the
    levels (`sample_deme_levels`) and ``eps`` from ``generator``, form the noisy input, predict with stage ``stage``'s
    adapter and, for the consistency term, with every adapter disabled (the pretrained model, no second copy in
    memory). DDPM family: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and ``|target - F_k(x_t, t)|^2`` (eps, v
    or x0, weight 1). ``FDMEDMScheduler``: ``sigma`` from the training distribution truncated to the stage's log-sigma
    range, ``x = x0 + sigma eps`` and ``lambda(sigma) (|D_k(x; sigma) - x0|^2 + c |D_k - D_theta|^2)``, ``D`` the
    preconditioned denoiser (`EDMObjective`).

    Under ``N`` processes, ``x0`` (``B`` samples) is shard ``r`` of a micro-batch of ``N B`` samples: the timesteps are
    drawn for the whole micro-batch from ``generator`` (seeded alike on every process) and samples ``[r B, (r + 1) B)``
    kept, and each sample's noise comes from its own generator (``noise_generators``), so the ``N`` shards together
    draw exactly what one process with the whole micro-batch draws (antithetic pairs and the per-batch range of
    ``antithetic_timesteps`` included: they span the micro-batch, not the shard).

    Args:
        model (`Callable`): The UNet carrying ``adapters`` (possibly wrapped by accelerate).
        adapters (`StageLoraAdapters`): Its per-stage adapters; ``stage`` is activated here.
        scheduler (`SchedulerMixin` or objective): The training noise scheduler (DDPM family or ``FDMEDMScheduler``),
            or its objective (`DiscreteObjective`, `EDMObjective`).
        x0 (`torch.Tensor`): Clean samples (latents for Stable Diffusion).
        stage (`int`): The stage being trained.
        generator (`torch.Generator`): CPU generator for the noise and timesteps (reproducible across runs).
        encoder_hidden_states (`torch.Tensor`, *optional*): Text embeddings for a conditional UNet.
        prob_sampling (`float`, defaults to 0.0): DeMe's probabilistic sampling probability ``p``.
        consistency_loss (`bool`, defaults to `False`): Add DeMe's consistency term.
        consistency_weight (`float`, defaults to 1.0): Its weight ``lambda``.
        antithetic_timesteps (`bool`, defaults to `False`): Draw the timesteps as the authors do
            (`sample_antithetic_timesteps`: antithetic pairs, ``p`` per batch) instead of `sample_deme_levels`;
            refused (`ValueError`) for a sigma-space base.
        teacher (`Callable`, *optional*): The frozen pretrained model of the consistency term (full finetuning);
            default: ``model`` with every adapter disabled.
        noise_generators (`list[torch.Generator]`, *optional*): One CPU generator per sample of ``x0`` for its noise
            (diffusers' ``randn_tensor``); default: ``generator``.
        num_shards (`int`, defaults to 1): ``N``, the processes sharing the micro-batch.
        shard_index (`int`, defaults to 0): ``r``, this process's shard, in ``[0, N)``.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= `shard_index` < `num_shards`, got {shard_index} and {num_shards}.")
    objective = objective_for_scheduler(scheduler)
    adapters.set_stage(stage)
    size = x0.shape[0]
    levels = draw_deme_levels(objective, adapters.stages, stage, size * num_shards, prob_sampling, generator,
                              antithetic_timesteps)  # fmt: skip
    levels = levels[shard_index * size : (shard_index + 1) * size]
    noise = randn_tensor(x0.shape, generator=noise_generators or generator, dtype=torch.float32)
    noise = noise.to(x0.device, x0.dtype)
    noisy = objective.noisy(x0, noise, levels)
    kwargs = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
    teacher_pred = None
    if consistency_loss and teacher is not None:
        with torch.no_grad():
            teacher_pred = objective.predict(teacher, noisy, levels, **kwargs)
    elif consistency_loss:
        with torch.no_grad(), adapters.disabled():
            teacher_pred = objective.predict(model, noisy, levels, **kwargs)
    pred = objective.predict(model, noisy, levels, **kwargs)
    weight = objective.loss_weight(levels)
    out = deme_loss(pred, objective.target(x0, noise, levels), teacher_pred, consistency_weight, weight)
    return DeMeLossOutput(out.loss, out.denoising_loss, out.consistency_loss, levels.to(x0.device))


def draw_deme_levels(
    objective, stages: TimestepStages, stage: int, batch_size: int, prob_sampling: float, generator, antithetic: bool
) -> torch.Tensor:
    """`sample_deme_levels`, or with ``antithetic`` the authors' `sample_antithetic_timesteps` (integer timesteps
    only: refused for a sigma-space objective)."""
    if not antithetic:
        return sample_deme_levels(objective, stages, stage, batch_size, prob_sampling, generator)
    if not isinstance(objective, DiscreteObjective):
        raise ValueError(
            "`antithetic_timesteps` pairs integer timesteps t and lo + hi - 1 - t; a sigma-space base "
            f"({type(objective.scheduler).__name__}) has no integer timesteps. Set `antithetic_timesteps=False`."
        )
    return sample_antithetic_timesteps(stages, stage, batch_size, prob_sampling, generator)

"""Decouple-then-Merge (DeMe) finetuning techniques: consistency loss, probabilistic sampling, channel projection.

One training step of one stage (`deme_training_step`) is shared by ``training/train_stage_lora.py`` and the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..stages import TimestepStages


def sample_deme_timesteps(
    stages: TimestepStages,
    stage: int,
    batch_size: int,
    prob_sampling: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    DeMe's probabilistic sampling: each timestep is drawn uniformly from all of ``[0, T)`` with probability ``p``,
    else uniformly from ``stage``'s range.

    Args:
        stages (`TimestepStages`): The stages.
        stage (`int`): The stage being finetuned.
        batch_size (`int`): Number of timesteps.
        prob_sampling (`float`, defaults to 0.0): ``p`` in ``[0, 1]`` (the authors' script uses 0.3).
        generator (`torch.Generator`, *optional*): CPU generator for reproducible draws.
    """
    if not 0.0 <= prob_sampling <= 1.0:
        raise ValueError(f"`prob_sampling` must be in [0, 1], got {prob_sampling}.")
    t = stages.sample_timesteps(stage, batch_size, generator=generator)
    if prob_sampling > 0:
        anywhere = torch.randint(0, stages.num_train_timesteps, (batch_size,), generator=generator)
        pick = torch.rand(batch_size, generator=generator) < prob_sampling
        t = torch.where(pick, anywhere, t)
    return t


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
    if not 0.0 <= prob_sampling <= 1.0:
        raise ValueError(f"`prob_sampling` must be in [0, 1], got {prob_sampling}.")
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
        timesteps (`torch.Tensor`, *optional*): The timesteps of the samples (`deme_training_step`).
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
) -> DeMeLossOutput:
    r"""
    DeMe's finetuning loss ``|eps - eps_i(x_t, t)|^2 + lambda |eps_theta(x_t, t) - eps_i(x_t, t)|^2`` (``lambda = 1``
    in the paper): the denoising loss of the stage model ``eps_i`` plus a consistency term that keeps it close to the
    frozen pretrained model ``eps_theta``.

    Args:
        model_pred (`torch.Tensor`): ``eps_i(x_t, t)`` (or the v / x0 prediction the scheduler trains).
        target (`torch.Tensor`): The regression target (``eps`` for epsilon prediction).
        teacher_pred (`torch.Tensor`, *optional*): ``eps_theta(x_t, t)`` of the pretrained model; no term when `None`.
        consistency_weight (`float`, defaults to 1.0): ``lambda``.
    """
    pred = model_pred.float()
    denoising = F.mse_loss(pred, target.float())
    consistency = F.mse_loss(pred, teacher_pred.float()) if teacher_pred is not None else torch.zeros_like(denoising)
    return DeMeLossOutput(denoising + consistency_weight * consistency, denoising, consistency)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The scheduler's regression target: ``eps``, ``v`` or ``x0`` by its ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"scheduler `prediction_type` must be 'epsilon', 'v_prediction' or 'sample', got {kind!r}.")


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
    The loss of one DeMe step for one stage: draw ``t`` (`sample_deme_timesteps`) and ``eps`` from ``generator``, form
    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, predict with stage ``stage``'s adapter and, for the consistency
    term, with every adapter disabled (the pretrained model, no second copy in memory).

    Under ``N`` processes, ``x0`` (``B`` samples) is shard ``r`` of a micro-batch of ``N B`` samples: the timesteps are
    drawn for the whole micro-batch from ``generator`` (seeded alike on every process) and samples ``[r B, (r + 1) B)``
    kept, and each sample's noise comes from its own generator (``noise_generators``), so the ``N`` shards together
    draw exactly what one process with the whole micro-batch draws (antithetic pairs and the per-batch range of
    ``antithetic_timesteps`` included: they span the micro-batch, not the shard).

    Args:
        model (`Callable`): The UNet carrying ``adapters`` (possibly wrapped by accelerate).
        adapters (`StageLoraAdapters`): Its per-stage adapters; ``stage`` is activated here.
        scheduler (`SchedulerMixin`): The training noise scheduler (``add_noise``, ``prediction_type``).
        x0 (`torch.Tensor`): Clean samples (latents for Stable Diffusion).
        stage (`int`): The stage being trained.
        generator (`torch.Generator`): CPU generator for the noise and timesteps (reproducible across runs).
        encoder_hidden_states (`torch.Tensor`, *optional*): Text embeddings for a conditional UNet.
        prob_sampling (`float`, defaults to 0.0): DeMe's probabilistic sampling probability ``p``.
        consistency_loss (`bool`, defaults to `False`): Add DeMe's consistency term.
        consistency_weight (`float`, defaults to 1.0): Its weight ``lambda``.
        antithetic_timesteps (`bool`, defaults to `False`): Draw the timesteps as the authors do
            (`sample_antithetic_timesteps`: antithetic pairs, ``p`` per batch) instead of `sample_deme_timesteps`.
        teacher (`Callable`, *optional*): The frozen pretrained model of the consistency term (full finetuning);
            default: ``model`` with every adapter disabled.
        noise_generators (`list[torch.Generator]`, *optional*): One CPU generator per sample of ``x0`` for its noise
            (diffusers' ``randn_tensor``); default: ``generator``.
        num_shards (`int`, defaults to 1): ``N``, the processes sharing the micro-batch.
        shard_index (`int`, defaults to 0): ``r``, this process's shard, in ``[0, N)``.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= `shard_index` < `num_shards`, got {shard_index} and {num_shards}.")
    adapters.set_stage(stage)
    draw = sample_antithetic_timesteps if antithetic_timesteps else sample_deme_timesteps
    size = x0.shape[0]
    timesteps = draw(adapters.stages, stage, size * num_shards, prob_sampling, generator)
    timesteps = timesteps[shard_index * size : (shard_index + 1) * size].to(x0.device)
    noise = randn_tensor(x0.shape, generator=noise_generators or generator, dtype=torch.float32)
    noise = noise.to(x0.device, x0.dtype)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    kwargs = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
    teacher_pred = None
    if consistency_loss and teacher is not None:
        with torch.no_grad():
            teacher_pred = teacher(noisy, timesteps, **kwargs).sample
    elif consistency_loss:
        with torch.no_grad(), adapters.disabled():
            teacher_pred = model(noisy, timesteps, **kwargs).sample
    pred = model(noisy, timesteps, **kwargs).sample
    out = deme_loss(pred, training_target(scheduler, x0, noise, timesteps), teacher_pred, consistency_weight)
    return DeMeLossOutput(out.loss, out.denoising_loss, out.consistency_loss, timesteps)

"""Gradient-based task similarity of a (pre)trained model: the TDC grouping and the multi-stage authors' baseline.

Timestep ``t`` is a task with the eps-prediction loss ``L_t(theta) = E |eps_theta(sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps, t) - eps|^2``. Two timesteps are similar tasks when their loss gradients point the same way:
``M_st = cos(grad L_s, grad L_t)``. :func:`gradient_clustering` (method ``"gradient_difficulty"``, ours, used by TDC)
adds a difficulty signal (the loss ``L_t`` or the log-SNR) and segments by mean within-stage similarity;
:func:`gradient_interval_clustering` (method ``"gradient"``) is the multi-stage paper's gradient-based baseline as
their code computes it (the size-constrained interval clustering of ``-M`` on 100 timesteps).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ..stages import TimestepStages
from .interval import interval_clustering
from .noise_schedule import NoiseSchedule, as_noise_schedule
from .samples import as_sample_tensor
from .segmentation import TimestepClusteringOutput, check_grid, grid_edges, grid_timesteps, segment_contiguous


@dataclass
class GradientSimilarityOutput(BaseOutput):
    """
    Args:
        similarity (`torch.Tensor`): ``[G, G]`` cosine similarity of the per-timestep loss gradients.
        loss (`torch.Tensor`): ``[G]`` the per-timestep eps-prediction loss (the difficulty signal).
        timesteps (`torch.Tensor`): ``[G]`` the timesteps measured.
    """

    similarity: torch.Tensor
    loss: torch.Tensor
    timesteps: torch.Tensor


def _select_parameters(model: torch.nn.Module, parameters: Union[Iterable[str], None]):
    named = dict(model.named_parameters())
    if parameters is None:
        return list(named.items())
    prefixes = [parameters] if isinstance(parameters, str) else list(parameters)
    chosen = [(n, p) for n, p in named.items() if any(n == q or n.startswith(q + ".") for q in prefixes)]
    unmatched = [q for q in prefixes if not any(n == q or n.startswith(q + ".") for n in named)]
    if unmatched or not chosen:
        raise ValueError(
            f"`parameters` {unmatched or prefixes} match no parameter (or module prefix) of the model; "
            f"e.g. {list(named)[:3]}."
        )
    return chosen


def gradient_similarity(
    model: torch.nn.Module,
    noise_schedule: Union[NoiseSchedule, object, None],
    images: torch.Tensor,
    timesteps: Union[torch.Tensor, Iterable[int]],
    parameters: Union[Iterable[str], str, None] = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = True,
    return_dict: bool = True,
):
    r"""
    Per-timestep loss gradients of an eps-prediction model and their cosine similarities:

        g_t = grad_theta (1 / N) sum_n |eps_theta(sqrt(abar_t) x0_n + sqrt(1 - abar_t) eps_n, t) - eps_n|^2 / D,
        M_st = <g_s, g_t> / (|g_s| |g_t|)

    The same noise ``eps_n`` is used at every timestep (common random numbers). The model's parameters, their
    ``requires_grad`` flags, ``.grad`` buffers and train/eval mode are left as they were.

    Args:
        model (`torch.nn.Module`): e.g. a `UNet2DModel`; called as ``model(x_t, t)`` and returning ``.sample`` (or
            a tensor / tuple whose first element is the prediction).
        noise_schedule (`NoiseSchedule`, scheduler or config, *optional*): gives ``abar_t`` (default: VP-SDE).
        images (`torch.Tensor`): ``[N, C, H, W]`` training samples ``x0`` (pixels in ``[-1, 1]`` or latents).
        timesteps (`torch.Tensor` or list of int): the ``G`` training timesteps to compare.
        parameters (`str` or list of str, *optional*): parameter names or module prefixes (``"up_blocks.2"``,
            ``"conv_out"``) whose gradients are compared, for speed; default: all parameters.
        batch_size (`int`, defaults to 64): images per forward/backward pass.
        generator (`torch.Generator`, *optional*): the source of the noise.
        progress (`bool`, defaults to `True`): show a progress bar.
        return_dict (`bool`, defaults to `True`): return a `GradientSimilarityOutput` instead of a tuple.
    """
    images = as_sample_tensor(images, "images")
    schedule = as_noise_schedule(noise_schedule)
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    if timesteps.numel() < 1 or int(timesteps.min()) < 0 or int(timesteps.max()) >= schedule.num_train_timesteps:
        raise ValueError(f"`timesteps` must be non-empty and lie in [0, {schedule.num_train_timesteps}).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    chosen = _select_parameters(model, parameters)
    params = [p for _, p in chosen]
    device, dtype = params[0].device, params[0].dtype
    eps = torch.randn(images.shape, generator=generator)
    abar = schedule.alphas_cumprod
    was_training, flags = model.training, [p.requires_grad for p in params]
    grads, losses = [], []
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for t in tqdm(timesteps.tolist(), desc="gradient similarity", disable=not progress):
            a = float(abar[t])
            total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            loss_sum = 0.0
            for i in range(0, len(images), batch_size):
                x0 = images[i : i + batch_size].to(device=device, dtype=dtype)
                noise = eps[i : i + batch_size].to(device=device, dtype=dtype)
                x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
                out = model(x_t, torch.full((len(x0),), t, device=device, dtype=torch.long))
                pred = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
                loss = F.mse_loss(pred.float(), noise.float(), reduction="sum") / noise[0].numel()
                batch_grads = torch.autograd.grad(loss, params, allow_unused=True)
                for acc, g in zip(total, batch_grads):
                    if g is not None:
                        acc += g.float()
                loss_sum += float(loss.detach())
            grads.append(torch.cat([g.flatten() for g in total]).cpu() / len(images))
            losses.append(loss_sum / len(images))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    g = torch.stack(grads).double()
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    similarity = unit @ unit.T
    loss = torch.tensor(losses, dtype=torch.float64)
    if not return_dict:
        return similarity, loss, timesteps
    return GradientSimilarityOutput(similarity=similarity, loss=loss, timesteps=timesteps)


def _measure(model, data, schedule, grid_size, parameters, num_images, batch_size, seed, progress):
    """Gradient similarity on the grid's timesteps for a fixed random subset of ``num_images`` samples."""
    data = as_sample_tensor(data)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    if num_images is not None:
        order = order[:num_images]
    timesteps = grid_timesteps(schedule.num_train_timesteps, grid_size)
    return gradient_similarity(
        model, schedule, data[order], timesteps, parameters, batch_size, generator=generator, progress=progress
    )


def difficulty_closeness(difficulty: torch.Tensor) -> torch.Tensor:
    r"""``C_st = 1 - |d_s - d_t| / (max d - min d)``: how close two timesteps are in difficulty ``d`` (``[G, G]``)."""
    spread = float(difficulty.max() - difficulty.min()) or 1.0
    return 1 - (difficulty[:, None] - difficulty[None, :]).abs() / spread


def gradient_clustering(
    model: torch.nn.Module,
    data: torch.Tensor,
    num_stages: int,
    noise_schedule: Union[NoiseSchedule, object, None] = None,
    grid_size: int = 50,
    difficulty_weight: float = 0.5,
    difficulty: Literal["loss", "snr"] = "loss",
    parameters: Union[Iterable[str], str, None] = None,
    num_images: int | None = 256,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> TimestepClusteringOutput:
    r"""
    Method ``"gradient_difficulty"`` (ours; the TDC grouping, whose details the TDC paper did not publish):
    contiguous stages of similar and equally difficult timesteps for a (pre)trained model. The grid cells are
    segmented (:func:`segment_contiguous`) on

        M = (1 - w) cos(g_s, g_t) + w (1 - |d_s - d_t| / (max d - min d))

    with ``w = difficulty_weight`` and the difficulty ``d_t = log L_t`` (``difficulty="loss"``, the measured
    per-timestep loss) or ``d_t = -log SNR_t = log((1 - abar_t) / abar_t)`` (``difficulty="snr"``, the SNR-based
    difficulty of the TDC paper; data-free).

    Args:
        model (`torch.nn.Module`): an eps-prediction model such as `UNet2DModel`.
        data (`torch.Tensor`): ``[N, C, H, W]`` training samples.
        num_stages (`int`): ``K``, in ``[1, grid_size]``.
        noise_schedule (*optional*): the model's training schedule (default: the VP-SDE, ``T = 1000``).
        grid_size (`int`, defaults to 50): number of timesteps measured (one per grid cell).
        difficulty_weight (`float`, defaults to 0.5): ``w`` in ``[0, 1]``.
        difficulty (`str`, defaults to `"loss"`): ``"loss"`` or ``"snr"``, see above.
        parameters (*optional*): see :func:`gradient_similarity`.
        num_images (`int`, *optional*, defaults to 256): the first ``num_images`` samples of a fixed random
            permutation are used (``None``: all).
        batch_size (`int`, defaults to 64): images per pass.
        seed (`int`, defaults to 0): seeds the image subset and the noise.
        progress (`bool`, defaults to `True`): show a progress bar.
    """
    schedule = as_noise_schedule(noise_schedule)
    check_grid(schedule.num_train_timesteps, grid_size, num_stages)
    if not 0.0 <= difficulty_weight <= 1.0:
        raise ValueError(f"`difficulty_weight` must lie in [0, 1], got {difficulty_weight}.")
    if difficulty not in ("loss", "snr"):
        raise ValueError(f"`difficulty` must be 'loss' or 'snr', got {difficulty!r}.")
    out = _measure(model, data, schedule, grid_size, parameters, num_images, batch_size, seed, progress)
    if difficulty == "loss":
        level = out.loss.clamp_min(1e-30).log()
    else:
        level = -schedule.log_snr[out.timesteps]
    combined = (1 - difficulty_weight) * out.similarity + difficulty_weight * difficulty_closeness(level)
    edges = grid_edges(schedule.num_train_timesteps, grid_size)
    cells = segment_contiguous(combined, num_stages)
    stages = TimestepStages(
        [edges[c] for c in cells], num_train_timesteps=schedule.num_train_timesteps, method="gradient_difficulty"
    )
    return TimestepClusteringOutput(
        stages=stages, grid_timesteps=out.timesteps, similarity=combined, curves={"loss": out.loss}
    )


def gradient_interval_clustering(
    model: torch.nn.Module,
    data: torch.Tensor,
    num_stages: int,
    noise_schedule: Union[NoiseSchedule, object, None] = None,
    grid_size: int = 100,
    parameters: Union[Iterable[str], str, None] = None,
    num_images: int | None = 128,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> TimestepClusteringOutput:
    r"""
    Method ``"gradient"``: the multi-stage paper's gradient-based ablation baseline as the authors' code computes
    it: the cosine similarities ``M_st`` of the loss gradients of all parameters on ``grid_size`` timesteps (their
    code: 100, one batch of images) clustered by the size-constrained interval clustering
    (:func:`~diffusers_stages.clustering.interval.interval_clustering`) with ``d[m, j] = -M_mj``. Differences from
    their code: the same noise at every timestep (theirs draws new noise per timestep), the model in eval mode, one
    model (theirs averages ``M`` over checkpoints), and grid cell starts as boundaries (theirs reports the start
    time ``(c + 1) / 100``).

    Args:
        model (`torch.nn.Module`): an eps-prediction model such as `UNet2DModel`.
        data (`torch.Tensor`): ``[N, C, H, W]`` training samples.
        num_stages (`int`): ``K``, in ``[1, grid_size]``.
        noise_schedule (*optional*): the model's training schedule (default: the VP-SDE, ``T = 1000``).
        grid_size (`int`, defaults to 100): number of timesteps measured (one per grid cell).
        parameters (*optional*): see :func:`gradient_similarity` (default: all, as the authors).
        num_images (`int`, *optional*, defaults to 128): images (the authors' batch size; ``None``: all).
        batch_size, seed, progress: see :func:`gradient_clustering`.
    """
    schedule = as_noise_schedule(noise_schedule)
    check_grid(schedule.num_train_timesteps, grid_size, num_stages)
    out = _measure(model, data, schedule, grid_size, parameters, num_images, batch_size, seed, progress)
    edges = grid_edges(schedule.num_train_timesteps, grid_size)
    cells = interval_clustering(-out.similarity, num_stages)
    stages = TimestepStages(
        [edges[c] for c in cells], num_train_timesteps=schedule.num_train_timesteps, method="gradient"
    )
    return TimestepClusteringOutput(
        stages=stages, grid_timesteps=out.timesteps, similarity=out.similarity, curves={"loss": out.loss}
    )

"""Timestep clustering: divide the training time range ``[0, T)`` into stages.

One entry point, :func:`cluster_timesteps`, over these methods:

- ``"optimal_denoiser"``: the multi-stage paper's Algorithm 1 on the closed-form optimal denoiser of the data;
- the paper's ablation baselines as the authors' code computes them: ``"uniform"`` (equal numbers of timesteps),
  ``"snr"`` (size-constrained interval clustering of log-SNR), ``"gradient"`` (the same clustering of the cosine
  similarity of per-timestep loss gradients of a model);
- ours: ``"uniform_log_snr"`` (equal widths in log-SNR) and ``"gradient_difficulty"`` (gradient similarity plus a
  difficulty signal, segmented by mean within-stage similarity: the TDC grouping).
"""

from __future__ import annotations

import inspect
from typing import Literal

from .baselines import snr_clustering, uniform_clustering, uniform_log_snr_clustering
from .gradient import (
    GradientSimilarityOutput,
    gradient_clustering,
    gradient_interval_clustering,
    gradient_similarity,
)
from .interval import interval_clustering
from .noise_schedule import NoiseSchedule, as_noise_schedule
from .optimal_denoiser import (
    OptimalDenoiserSimilarityOutput,
    optimal_denoiser,
    optimal_denoiser_clustering,
    optimal_denoiser_similarity,
    threshold_boundaries,
)
from .plotting import plot_clustering
from .samples import encode_latents
from .segmentation import TimestepClusteringOutput, segment_contiguous

CLUSTERING_METHODS = {
    "optimal_denoiser": optimal_denoiser_clustering,
    "uniform": uniform_clustering,
    "snr": snr_clustering,
    "gradient": gradient_interval_clustering,
    "uniform_log_snr": uniform_log_snr_clustering,
    "gradient_difficulty": gradient_clustering,
}
DATA_METHODS = ("optimal_denoiser", "gradient", "gradient_difficulty")
MODEL_METHODS = ("gradient", "gradient_difficulty")


def cluster_timesteps(
    method: Literal["optimal_denoiser", "uniform", "snr", "gradient", "uniform_log_snr", "gradient_difficulty"],
    num_stages: int,
    data=None,
    noise_schedule=None,
    model=None,
    num_train_timesteps: int = 1000,
    seed: int = 0,
    return_details: bool = False,
    **options,
):
    r"""
    Divide the training timesteps ``[0, T)`` into ``num_stages`` contiguous stages (stage 0 = least noisy).

    Args:
        method (`str`): ``"optimal_denoiser"``, ``"uniform"``, ``"snr"``, ``"gradient"`` (the paper's methods, as
            the authors' code computes them), ``"uniform_log_snr"`` or ``"gradient_difficulty"`` (ours).
        num_stages (`int`): ``K >= 1``; at most the grid size (``grid_size`` for the data-driven methods, ``T``
            for the baselines).
        data (`torch.Tensor`, *optional*): ``[N, C, H, W]`` training samples (pixels in ``[-1, 1]`` or VAE
            latents, see `encode_latents`); required by ``"optimal_denoiser"``, ``"gradient"`` and
            ``"gradient_difficulty"``.
        noise_schedule (*optional*): a `NoiseSchedule`, a diffusers scheduler with ``alphas_cumprod``, its config
            or config path; default: the paper's VP-SDE (``beta_min = 0.1``, ``beta_max = 20``) on
            ``num_train_timesteps`` points.
        model (`torch.nn.Module`, *optional*): the eps-prediction model for ``"gradient"`` and
            ``"gradient_difficulty"``.
        num_train_timesteps (`int`, defaults to 1000): ``T`` of the default VP schedule.
        seed (`int`, defaults to 0): seeds every random draw of the data-driven methods (the baselines are
            deterministic); the same seed gives the same stages.
        return_details (`bool`, defaults to `False`): return a `TimestepClusteringOutput` (stages, grid,
            similarity matrix, curves) instead of the `TimestepStages` alone.
        **options: the method's options (``alpha``, ``eta``, ``pixel_range``, ``space``, ``num_samples``,
            ``grid_size``, ``boundary_rule``, ``difficulty_weight``, ``difficulty``, ``parameters``, ...); see
            `optimal_denoiser_clustering`, `gradient_interval_clustering` and `gradient_clustering`.

    Returns:
        `TimestepStages` (with ``method`` in its config), or a `TimestepClusteringOutput`.
    """
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"`method` must be one of {sorted(CLUSTERING_METHODS)}, got {method!r}.")
    func = CLUSTERING_METHODS[method]
    schedule = as_noise_schedule(noise_schedule, num_train_timesteps)
    accepted = set(inspect.signature(func).parameters) - {"data", "model", "num_stages", "noise_schedule", "seed"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; accepted: {sorted(accepted)}.")
    kwargs = dict(options, num_stages=num_stages, noise_schedule=schedule)
    if method == "optimal_denoiser":
        kwargs.setdefault("pairwise", return_details)  # the [G, G] matrix only when someone will look at it
    if method in DATA_METHODS:
        kwargs["seed"] = seed
        if data is None:
            raise ValueError(f"method {method!r} needs `data`: a tensor [N, C, H, W] of training samples.")
        kwargs["data"] = data
    if method in MODEL_METHODS:
        if model is None:
            raise ValueError(f"method {method!r} needs `model`: a (pre)trained eps-prediction model.")
        kwargs["model"] = model
    out = func(**kwargs)
    return out if return_details else out.stages


__all__ = [
    "CLUSTERING_METHODS",
    "GradientSimilarityOutput",
    "NoiseSchedule",
    "OptimalDenoiserSimilarityOutput",
    "TimestepClusteringOutput",
    "cluster_timesteps",
    "encode_latents",
    "gradient_clustering",
    "gradient_interval_clustering",
    "gradient_similarity",
    "interval_clustering",
    "optimal_denoiser",
    "optimal_denoiser_clustering",
    "optimal_denoiser_similarity",
    "plot_clustering",
    "segment_contiguous",
    "snr_clustering",
    "threshold_boundaries",
    "uniform_clustering",
    "uniform_log_snr_clustering",
]

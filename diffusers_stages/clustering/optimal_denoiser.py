"""Optimal-denoiser timestep clustering (the multi-stage paper's Algorithm 1).

The closed-form optimal denoiser of a finite training set ``{y_i}`` at VE noise level ``sigma`` is the posterior
mean ``D(x; sigma) = sum_i w_i y_i / sum_i w_i`` with ``w_i = exp(-|x - y_i|^2 / (2 sigma^2))``; its noise
prediction is ``eps*_sigma(x) = (x - D(x; sigma)) / sigma``. Timestep ``t`` of a VP schedule is the VE level
``sigma_t = sqrt((1 - abar_t) / abar_t)``. The two extreme tasks are the denoiser's limits at the same noisy
input: ``eps*_0`` (``sigma -> 0``: the posterior collapses onto the clean sample ``y``) and ``eps*_1``
(``sigma -> inf``: the posterior mean is the dataset mean ``ybar``). Two tasks agree on a sample by the fraction of
pixels whose predictions differ by at most ``eta``: clean-image predictions (``space="x0"``, ``eta`` on the ``[0, 1]``
scale) or noise predictions (``space="epsilon"``, the authors' code). ``pixel_range="[0, 1]"`` runs the denoiser on
``(y + 1) / 2`` (the paper's and the authors' pixel scale), ``"[-1, 1]"`` on the data as given.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Union

import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ..stages import TimestepStages
from .noise_schedule import NoiseSchedule, as_noise_schedule
from .samples import as_sample_tensor
from .segmentation import TimestepClusteringOutput, check_grid, grid_edges, grid_timesteps, segment_contiguous

# logits held in memory at once by the batched denoiser (queries x training samples)
_MAX_LOGITS = 1 << 23
PIXEL_RANGES = {"[0, 1]": 0.5, "[-1, 1]": 1.0}  # the factor applied to data given in [-1, 1]
SPACES = ("x0", "epsilon")


@torch.no_grad()
def optimal_denoiser(
    noisy: torch.Tensor,
    data: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    batch_size: int = 512,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    r"""
    The closed-form optimal denoiser of a training set (the posterior mean ``E[y | x]`` under the empirical data
    distribution), over the WHOLE set, batched, with a streaming log-sum-exp over the training samples:

        D(x; sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i,     eps*_sigma(x) = (x - D(x; sigma)) / sigma

    The logits are computed as ``(x . y_i - |y_i|^2 / 2) / sigma^2`` (the ``|x|^2`` term cancels in the softmax)
    after centring ``x`` and ``y_i`` on the data mean (the posterior mean is shift-equivariant), which keeps the
    dot products small and float32 accurate.

    Args:
        noisy (`torch.Tensor`): ``[Q, ...]`` VE-form noisy inputs ``x = y + sigma eps``.
        data (`torch.Tensor`): ``[N, ...]`` the training samples ``y_i`` (same trailing shape as ``noisy``).
        sigma (`float` or `torch.Tensor`): the noise level, one for all queries or ``[Q]``; must be positive.
        batch_size (`int`, defaults to 512): queries per batch.
        dtype (`torch.dtype`, defaults to `torch.float64`): compute precision.

    Returns:
        `torch.Tensor`: ``D(x; sigma)`` with the shape of ``noisy``, in ``dtype``.
    """
    if noisy.shape[1:] != data.shape[1:]:
        raise ValueError(f"`noisy` {tuple(noisy.shape)} and `data` {tuple(data.shape)} differ in sample shape.")
    if data.shape[0] == 0:
        raise ValueError("`data` is empty: at least one training sample is needed.")
    y = data.reshape(len(data), -1).to(dtype)
    centre = y.mean(0)
    y = y - centre
    x = noisy.reshape(len(noisy), -1).to(dtype) - centre
    sigma = torch.as_tensor(sigma, dtype=dtype).flatten().to(x.device)
    if sigma.numel() == 1:
        sigma = sigma.expand(len(x))
    if sigma.numel() != len(x):
        raise ValueError(f"`sigma` must be a scalar or hold one value per query ({len(x)}), got {sigma.numel()}.")
    if not bool((sigma > 0).all()):
        raise ValueError("`sigma` must be positive.")
    half_sq = 0.5 * (y * y).sum(1)
    log_tiny = math.log(torch.finfo(dtype).tiny)
    out = torch.empty_like(x)
    chunk = max(1, _MAX_LOGITS // batch_size)
    for q in range(0, len(x), batch_size):
        xq, inv_var = x[q : q + batch_size], sigma[q : q + batch_size, None] ** -2
        run_max = torch.full((len(xq), 1), -math.inf, dtype=dtype, device=x.device)
        run_sum = torch.zeros(len(xq), 1, dtype=dtype, device=x.device)
        run_acc = torch.zeros_like(xq)
        for i in range(0, len(y), chunk):
            yi = y[i : i + chunk]
            logits = (xq @ yi.T - half_sq[i : i + chunk]) * inv_var
            new_max = torch.maximum(run_max, logits.amax(1, keepdim=True))
            rescale = torch.exp(run_max - new_max)
            # weights below the smallest normal float are flushed to 0 (denormals slow the matmul ~20x)
            shifted = logits - new_max
            w = torch.exp(shifted.masked_fill_(shifted < log_tiny, -math.inf))
            run_sum = run_sum * rescale + w.sum(1, keepdim=True)
            run_acc = run_acc * rescale + w @ yi
            run_max = new_max
        out[q : q + batch_size] = run_acc / run_sum + centre
    return out.reshape(noisy.shape)


@dataclass
class OptimalDenoiserSimilarityOutput(BaseOutput):
    """
    Agreement between the optimal denoiser's tasks on a timestep grid, including its two limits.

    Args:
        grid_timesteps (`torch.Tensor`): ``[G]`` the training timestep of each grid cell.
        task_similarity (`torch.Tensor`, *optional*): ``[G + 2, G + 2]`` mean agreement ``E[D]`` between the tasks
            ordered as ``[eps*_0, t_0, ..., t_{G-1}, eps*_1]`` (row 0 holds ``S0``, the last row ``S1``); ``None``
            when only the curves were asked for (``pairwise=False``).
        S0 (`torch.Tensor`): ``[G]`` similarity of each grid timestep to the ``sigma -> 0`` limit.
        S1 (`torch.Tensor`): ``[G]`` similarity of each grid timestep to the ``sigma -> inf`` limit.
    """

    grid_timesteps: torch.Tensor
    task_similarity: torch.Tensor | None
    S0: torch.Tensor
    S1: torch.Tensor


@torch.no_grad()
def optimal_denoiser_similarity(
    data: torch.Tensor,
    noise_schedule: Union[NoiseSchedule, object, None] = None,
    grid_size: int = 200,
    num_samples: int = 64,
    eta: float = 2 / 255,
    data_range: float = 2.0,
    pixel_range: Literal["[0, 1]", "[-1, 1]"] = "[0, 1]",
    space: Literal["x0", "epsilon"] = "x0",
    batch_size: int = 512,
    dtype: torch.dtype = torch.float32,
    pairwise: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> OptimalDenoiserSimilarityOutput:
    r"""
    Measure ``S0(t) = E[D(t, eps*_0)]``, ``S1(t) = E[D(t, eps*_1)]`` and the agreement between every pair of grid
    timesteps. ``num_samples`` pairs ``(y, eps)`` are drawn once (``y`` from the training set) and shared by all
    timesteps (common random numbers: smooth curves, one consistent matrix). The data are scaled by ``s`` (``1/2``
    for ``pixel_range="[0, 1]"``, else 1); timestep ``t`` predicts ``D_t = D(s y + sigma_t eps; sigma_t)``, the
    limits ``s y`` and ``s ybar``. Two tasks agree on the fraction ``D`` of pixels with

        space="x0":       |D_a - D_b| <= eta * s * data_range
        space="epsilon":  |eps_a - eps_b| <= eta,    eps_t = (x_t - D_t) / sigma_t = eps + (s y - D_t) / sigma_t

    In noise space ``eps*_0`` predicts ``eps`` and ``eps*_1`` predicts ``eps + (s y - s ybar) / sigma_t`` at the
    input of timestep ``t``: its agreement with ``t`` is ``|D_t - s ybar| <= eta sigma_t`` (and with ``eps*_0`` it is
    taken at the largest grid ``sigma``).

    Args:
        data (`torch.Tensor`): ``[N, C, H, W]`` the whole training set (pixels in ``[-1, 1]`` or VAE latents).
        noise_schedule (`NoiseSchedule`, scheduler or config, *optional*): defaults to the paper's VP-SDE (T = 1000).
        grid_size (`int`, defaults to 200): number of grid cells ``G`` evaluated over ``[0, T)``.
        num_samples (`int`, defaults to 64): pairs ``(y, eps)`` per timestep (the authors' code used 20).
        eta (`float`, defaults to 2/255): agreement tolerance: on the ``[0, 1]`` scale of the data range
            (``space="x0"``) or in noise units (``space="epsilon"``); 2/255 is the authors' value.
        data_range (`float`, defaults to 2.0): the width of the value range of ``data`` as given (2 for ``[-1, 1]``
            images); for latents choose it from their spread.
        pixel_range (`str`, defaults to `"[0, 1]"`): ``"[0, 1]"`` diffuses ``(data + 1) / 2`` (the paper and the
            authors' code; as if the noise were twice as large relative to the data), ``"[-1, 1]"`` the data as
            given (the range our pixel models train on; use it for latents).
        space (`str`, defaults to `"x0"`): compare clean-image predictions (``"x0"``) or noise predictions
            (``"epsilon"``, the authors' code).
        batch_size (`int`, defaults to 512): denoiser queries per batch.
        dtype (`torch.dtype`, defaults to `torch.float32`): precision of the denoiser (float64 is ~8x slower on
            CPU and changes ``S0`` / ``S1`` on MNIST by less than the benchmark reports).
        pairwise (`bool`, defaults to `True`): also measure the agreement between every pair of grid timesteps
            (``O(G^2)``; needed by the segmentation rule and the plots). ``False`` gives ``S0`` and ``S1`` only.
        generator (`torch.Generator`, *optional*): the source of ``(y, eps)``.
        progress (`bool`, defaults to `True`): show progress bars.
    """
    data = as_sample_tensor(data)
    schedule = as_noise_schedule(noise_schedule)
    check_grid(schedule.num_train_timesteps, grid_size)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")
    if not eta > 0 or not data_range > 0:
        raise ValueError(f"`eta` and `data_range` must be positive, got {eta} and {data_range}.")
    if pixel_range not in PIXEL_RANGES:
        raise ValueError(f"`pixel_range` must be one of {sorted(PIXEL_RANGES)}, got {pixel_range!r}.")
    if space not in SPACES:
        raise ValueError(f"`space` must be one of {SPACES}, got {space!r}.")
    scale = PIXEL_RANGES[pixel_range]
    n = len(data)
    flat = data.reshape(n, -1).to(torch.float64) * scale
    if num_samples <= n:
        index = torch.randperm(n, generator=generator)[:num_samples]
    else:
        index = torch.randint(n, (num_samples,), generator=generator)
    y = flat[index.to(flat.device)]
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(flat.device)
    timesteps = grid_timesteps(schedule.num_train_timesteps, grid_size)
    sigmas = schedule.sigmas[timesteps].to(flat.device)
    # tasks in order [limit 0, grid cells..., limit inf], each [S, D]; queries are grid-major, built per batch
    tasks = torch.empty(grid_size + 2, num_samples, y.shape[1], dtype=torch.float32)
    tasks[0], tasks[-1] = y, flat.mean(0)
    train = flat.to(dtype)
    preds = tasks[1:-1].view(-1, y.shape[1])
    sample, cell = torch.arange(len(preds)) % num_samples, torch.arange(len(preds)) // num_samples
    for q in tqdm(range(0, len(preds), batch_size), desc="optimal denoiser", disable=not progress):
        s, sig = sample[q : q + batch_size], sigmas[cell[q : q + batch_size]]
        noisy = y[s] + sig[:, None] * eps[s]
        preds[q : q + batch_size] = optimal_denoiser(noisy, train, sig, batch_size=batch_size, dtype=dtype)
    if space == "x0":
        tol = eta * data_range * scale
        similarity = _agreement_matrix(tasks, tol, progress) if pairwise else None
    else:
        tol = eta * sigmas.float()[:, None, None]  # limit tolerances in x0 units, per grid cell
        similarity = _noise_agreement_matrix(tasks, sigmas, eta, progress) if pairwise else None
    if similarity is not None:
        S0, S1 = similarity[0, 1:-1], similarity[-1, 1:-1]
    else:
        S0, S1 = (((tasks[1:-1] - tasks[i]).abs() <= tol).flatten(1).double().mean(1) for i in (0, -1))
    return OptimalDenoiserSimilarityOutput(grid_timesteps=timesteps, task_similarity=similarity, S0=S0, S1=S1)


def _noise_agreement_matrix(tasks: torch.Tensor, sigmas: torch.Tensor, eta: float, progress: bool) -> torch.Tensor:
    """
    The agreement matrix of noise predictions for clean-image ``tasks`` ``[G + 2, S, D]`` (limits first and last):
    the grid cells and ``eps*_0`` compared as residuals ``(y - D_t) / sigma_t`` (the shared ``eps`` cancels),
    ``eps*_1`` against cell ``t`` at ``sigma_t`` and against ``eps*_0`` at the largest ``sigma``.
    """
    sig = sigmas.float()[:, None, None]
    residuals = torch.cat([torch.zeros_like(tasks[:1]), (tasks[0] - tasks[1:-1]) / sig])
    m = torch.ones(len(tasks), len(tasks), dtype=torch.float64)
    m[:-1, :-1] = _agreement_matrix(residuals, eta, progress)
    limit = ((tasks[1:-1] - tasks[-1]).abs() <= eta * sig).flatten(1).double().mean(1)
    corner = ((tasks[0] - tasks[-1]).abs() <= eta * sig[-1]).double().mean()
    m[-1, 1:-1] = m[1:-1, -1] = limit
    m[0, -1] = m[-1, 0] = corner
    return m


def _agreement_matrix(tasks: torch.Tensor, tol: float, progress: bool) -> torch.Tensor:
    """
    ``M[a, b]`` = mean over samples and pixels of ``|tasks[a] - tasks[b]| <= tol`` for ``tasks`` ``[A, S, D]``.
    (sample, pixel) entries whose values span at most ``tol`` over all tasks agree for every pair; they are counted
    once instead of compared (MNIST's empty borders), which is exact.
    """
    a = len(tasks)
    flat = tasks.flatten(1)
    constant = (flat.amax(0) - flat.amin(0)) <= tol
    varying = flat[:, ~constant].contiguous()
    total, always = flat.shape[1], int(constant.sum())
    m = torch.eye(a, dtype=torch.float64)
    for i in tqdm(range(a - 1), desc="task agreement", disable=not progress):
        diff = varying[i + 1 :] - varying[i]
        agree = (torch.count_nonzero(diff.abs_() <= tol, dim=1) + always).double() / total
        m[i, i + 1 :] = agree
        m[i + 1 :, i] = agree
    return m


def threshold_boundaries(S0: torch.Tensor, S1: torch.Tensor, alpha: float) -> tuple[int, int]:
    r"""
    The paper's two-threshold rule for 3 stages on a grid of ``G`` cells: ``t1`` is the largest edge ``e`` with
    ``mean(S0[:e]) >= alpha``, ``t2`` the smallest edge with ``mean(S1[e:]) >= alpha`` (edges ``1 .. G-1``).

    Returns:
        `tuple[int, int]`: the two cell edges. Raises a `ValueError` when no edge qualifies or ``t1 >= t2``.
    """
    g = len(S0)
    if g < 3:
        raise ValueError(f"the threshold rule needs a grid of at least 3 cells (`grid_size`), got {g}.")
    edges = torch.arange(1, g)
    mean_s0 = S0.cumsum(0)[:-1] / edges  # mean over cells [0, e)
    mean_s1 = S1.flip(0).cumsum(0).flip(0)[1:] / (g - edges)  # mean over cells [e, G)
    ok0, ok1 = edges[mean_s0 >= alpha], edges[mean_s1 >= alpha]
    if len(ok0) == 0 or len(ok1) == 0 or int(ok0.max()) >= int(ok1.min()):
        raise ValueError(
            f"the two-threshold rule found no valid boundaries for `alpha`={alpha} (mean S0 >= alpha up to edge "
            f"{int(ok0.max()) if len(ok0) else None}, mean S1 >= alpha from edge {int(ok1.min()) if len(ok1) else None}"
            f" of {g}); choose another `alpha` or `boundary_rule='segmentation'`."
        )
    return int(ok0.max()), int(ok1.min())


def optimal_denoiser_clustering(
    data: torch.Tensor,
    num_stages: int,
    noise_schedule: Union[NoiseSchedule, object, None] = None,
    alpha: float = 0.9,
    boundary_rule: Literal["auto", "threshold", "segmentation"] = "auto",
    grid_size: int = 200,
    num_samples: int = 64,
    eta: float = 2 / 255,
    data_range: float = 2.0,
    pixel_range: Literal["[0, 1]", "[-1, 1]"] = "[0, 1]",
    space: Literal["x0", "epsilon"] = "x0",
    batch_size: int = 512,
    pairwise: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> TimestepClusteringOutput:
    r"""
    Divide ``[0, T)`` into ``num_stages`` stages from the optimal denoiser of ``data``.

    ``boundary_rule="threshold"`` is the paper's rule for 3 stages (see :func:`threshold_boundaries`);
    ``"segmentation"`` works for any ``K``: the contiguous partition of the task sequence
    ``[eps*_0, t_0, ..., t_{G-1}, eps*_1]`` maximising the summed mean within-stage agreement
    (:func:`segment_contiguous`), so the first stage holds the ``sigma -> 0`` task and the last the
    ``sigma -> inf`` task. ``"auto"`` takes the threshold rule for ``K = 3`` and segmentation otherwise.

    Args:
        data (`torch.Tensor`): ``[N, C, H, W]`` the whole training set (pixels in ``[-1, 1]`` or VAE latents).
        num_stages (`int`): ``K >= 1``, at most ``grid_size``.
        noise_schedule: see :func:`optimal_denoiser_similarity`.
        alpha (`float`, defaults to 0.9): the similarity threshold of the two-threshold rule (not published). On
            the MNIST test set with the defaults (``[0, 1]`` pixels, ``x0`` comparisons) 0.9 gives t = (0.405,
            0.865); on ``[-1, 1]`` pixels ``S1`` only reaches 0.896 at ``t = 1``, so 0.9 admits no ``t2`` there
            (0.85 gives (0.655, 0.95)); with ``space="epsilon"`` 0.9 gives (0.415, 0.495) and 0.85 nothing. See
            the clustering docs for the full table.
        boundary_rule (`str`, defaults to `"auto"`): ``"threshold"`` (K = 3 only), ``"segmentation"``, or
            ``"auto"``: the threshold rule for ``K = 3`` when it yields valid boundaries, segmentation otherwise.
        grid_size, num_samples, eta, data_range, pixel_range, space, batch_size, progress: see
            :func:`optimal_denoiser_similarity`.
        pairwise (`bool`, defaults to `True`): measure the ``[G, G]`` similarity matrix even when the threshold
            rule does not need it (for plots and the output's ``similarity``). The segmentation rule always
            measures it; `cluster_timesteps` skips it when only the stages are returned.
        seed (`int`, defaults to 0): seeds the ``(y, eps)`` draws; the result is deterministic for a seed.
    """
    rules = ("auto", "threshold", "segmentation")
    if boundary_rule not in rules:
        raise ValueError(f"`boundary_rule` must be one of {rules}, got {boundary_rule!r}.")
    schedule = as_noise_schedule(noise_schedule)
    check_grid(schedule.num_train_timesteps, grid_size, num_stages)
    if boundary_rule == "threshold" and num_stages != 3:
        raise ValueError(f"`boundary_rule='threshold'` needs `num_stages` = 3, got {num_stages}.")
    data = as_sample_tensor(data)
    use_threshold = boundary_rule == "threshold" or (boundary_rule == "auto" and num_stages == 3)

    def measure(with_pairs: bool) -> OptimalDenoiserSimilarityOutput:
        return optimal_denoiser_similarity(
            data,
            schedule,
            grid_size=grid_size,
            num_samples=num_samples,
            eta=eta,
            data_range=data_range,
            pixel_range=pixel_range,
            space=space,
            batch_size=batch_size,
            pairwise=with_pairs,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )

    out = measure(pairwise or not use_threshold)
    cells = None
    if boundary_rule == "threshold":
        cells = list(threshold_boundaries(out.S0, out.S1, alpha))
    elif use_threshold:
        try:
            cells = list(threshold_boundaries(out.S0, out.S1, alpha))
        except ValueError as err:
            warnings.warn(f"{err} Falling back to the segmentation rule.", stacklevel=2)
    if cells is None:
        if out.task_similarity is None:  # the same seed gives the same draws: only the matrix is new
            out = measure(True)
        # task index a + 1 is grid cell a; a stage starting at task index s starts at cell s - 1
        starts = segment_contiguous(out.task_similarity, num_stages, first=2, last=grid_size)
        cells = [s - 1 for s in starts]
    edges = grid_edges(schedule.num_train_timesteps, grid_size)
    stages = TimestepStages(
        [edges[c] for c in cells], num_train_timesteps=schedule.num_train_timesteps, method="optimal_denoiser"
    )
    return TimestepClusteringOutput(
        stages=stages,
        grid_timesteps=out.grid_timesteps,
        similarity=None if out.task_similarity is None else out.task_similarity[1:-1, 1:-1],
        curves={"S0": out.S0, "S1": out.S1},
    )

"""Contiguous segmentation of a timestep grid into stages, and the result type every clustering method returns.

Every data-driven method measures a similarity matrix ``M`` between the timesteps of a grid (``G`` cells evenly
covering ``[0, T)``, cell ``g`` is ``[round(g T / G), round((g + 1) T / G))``). Stages are contiguous runs of
cells; :func:`segment_contiguous` finds the ``K`` runs that maximise the mean within-stage similarity summed over
stages (the "average association" of a contiguous partition), exactly, by dynamic programming.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils import BaseOutput

from ..stages import TimestepStages


@dataclass
class TimestepClusteringOutput(BaseOutput):
    """
    The stages found by a clustering method, with the measurements behind them.

    Args:
        stages (`TimestepStages`): the chosen stages (``method`` recorded in their config).
        grid_timesteps (`torch.Tensor`): ``[G]`` representative training timestep of each grid cell.
        similarity (`torch.Tensor`, *optional*): ``[G, G]`` similarity between grid cells (``None`` for the
            data-free baselines).
        curves (`dict[str, torch.Tensor]`): per-cell curves ``[G]`` (``S0`` / ``S1`` for the optimal denoiser,
            ``loss`` for the gradient method, ``log_snr`` for the baselines).
    """

    stages: TimestepStages
    grid_timesteps: torch.Tensor
    similarity: torch.Tensor | None = None
    curves: dict = field(default_factory=dict)


def grid_edges(num_train_timesteps: int, grid_size: int) -> list[int]:
    """The ``G + 1`` cell edges ``round(g T / G)`` of a grid of ``G`` cells over ``[0, T)``."""
    check_grid(num_train_timesteps, grid_size)
    return [round(g * num_train_timesteps / grid_size) for g in range(grid_size + 1)]


def grid_timesteps(num_train_timesteps: int, grid_size: int) -> torch.Tensor:
    """The representative timestep of each cell: the (lower) middle of ``[start, end)``."""
    edges = grid_edges(num_train_timesteps, grid_size)
    return torch.tensor([(a + b - 1) // 2 for a, b in zip(edges, edges[1:])], dtype=torch.long)


def check_grid(num_train_timesteps: int, grid_size: int, num_stages: int | None = None) -> None:
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or not 1 <= grid_size <= num_train_timesteps:
        raise ValueError(
            f"`grid_size` must be an int in [1, num_train_timesteps={num_train_timesteps}], got {grid_size!r}."
        )
    if num_stages is not None:
        check_num_stages(num_stages, grid_size, "grid_size")


def check_num_stages(num_stages: int, limit: int, limit_name: str) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"`num_stages` must be an int >= 1, got {num_stages!r}.")
    if num_stages > limit:
        raise ValueError(f"`num_stages` ({num_stages}) cannot be larger than the grid (`{limit_name}` = {limit}).")


def segment_contiguous(similarity: torch.Tensor, num_segments: int, first: int = 1, last: int | None = None):
    r"""
    Split ``n`` ordered points into ``K`` contiguous, non-empty segments maximising

        sum_k  (1 / n_k) sum_{i, j in segment k} M_ij

    (the mean within-segment similarity times the segment length, summed over segments), exactly, in
    ``O(K n^2)`` by dynamic programming over 2-D prefix sums of ``M``.

    Args:
        similarity (`torch.Tensor`): symmetric ``[n, n]`` similarity matrix of the ordered points.
        num_segments (`int`): ``K``, at least 1 and at most the number of admissible segments.
        first (`int`, defaults to 1): the smallest admissible segment start (after the first segment).
        last (`int`, *optional*): the largest admissible segment start (defaults to ``n - 1``).

    Returns:
        `list[int]`: the ``K - 1`` starts of segments ``1, ..., K - 1``, strictly increasing.
    """
    m = torch.as_tensor(similarity, dtype=torch.float64).cpu().numpy()
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"`similarity` must be a square [n, n] matrix, got shape {tuple(m.shape)}.")
    n = m.shape[0]
    last = n - 1 if last is None else last
    check_num_stages(num_segments, max(1, last - first + 2), "number of admissible segment starts + 1")
    if num_segments == 1:
        return []
    prefix = np.zeros((n + 1, n + 1))
    prefix[1:, 1:] = m.cumsum(0).cumsum(1)
    idx = np.arange(n + 1)
    i, j = idx[:, None], idx[None, :]
    block = prefix[j, j] - prefix[i, j] - prefix[j, i] + prefix[i, i]
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(j > i, block / np.maximum(j - i, 1), -np.inf)
    allowed = np.zeros(n + 1, dtype=bool)
    allowed[first : last + 1] = True
    allowed[[0, n]] = True
    gain[~allowed, :] = -np.inf
    gain[:, ~allowed] = -np.inf
    return best_partition(gain, num_segments)


def best_partition(gain: np.ndarray, num_segments: int) -> list[int]:
    r"""
    The partition of ``n`` ordered points into ``K`` contiguous segments ``[a, b)`` maximising ``sum gain[a, b]``,
    exactly, by dynamic programming in ``O(K n^2)``; ``-inf`` marks inadmissible segments.

    Args:
        gain (`np.ndarray`): ``[n + 1, n + 1]`` the value of segment ``[a, b)`` at ``gain[a, b]``.
        num_segments (`int`): ``K >= 1``.

    Returns:
        `list[int]`: the ``K - 1`` starts of segments ``1, ..., K - 1``, strictly increasing. Raises a `ValueError`
        when no admissible partition exists.
    """
    n = gain.shape[0] - 1
    idx = np.arange(n + 1)
    # best[j]: the best score of splitting points [0, j) into k segments; choice[k][j]: the start of the last one
    best = np.where(idx == 0, 0.0, -np.inf)
    choices = []
    for _ in range(num_segments):
        scores = best[:, None] + gain
        choice = scores.argmax(0)
        best = scores[choice, idx]
        choices.append(choice)
    if not np.isfinite(best[n]):
        raise ValueError(f"cannot split {n} points into {num_segments} admissible contiguous segments.")
    starts, end = [], n
    for choice in reversed(choices):
        end = int(choice[end])
        starts.append(end)
    return sorted(starts)[1:]

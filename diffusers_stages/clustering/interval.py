"""The multi-stage authors' interval clustering: the partition behind their SNR and gradient ablation baselines.

Their code (``interval_cluster`` in ``LucasYFL/Multistage_Diffusion``) splits ``n`` ordered timesteps into ``K``
contiguous intervals minimising the summed cost of the intervals, where an interval is costed around its middle
point (a medoid), and the sizes are constrained so that no interval is much smaller or larger than ``n / K``.
Their two baselines differ only in the dissimilarity: log-SNR distance (``"snr"``) and negative cosine similarity
of loss gradients (``"gradient"``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .segmentation import best_partition, check_num_stages


def interval_size_limits(n: int, num_stages: int) -> tuple[int, int]:
    """The authors' size limits ``(floor(n / 2K), ceil(3n / 2K))`` of an interval of ``n`` points in ``K``."""
    return math.floor(n / (2 * num_stages)), math.ceil(3 * n / (2 * num_stages))


def interval_clustering(dissimilarity: torch.Tensor, num_stages: int) -> list[int]:
    r"""
    The authors' size-constrained interval clustering of ``n`` ordered points into ``K`` contiguous intervals:

        minimise  sum_k sum_{j in [a_k, b_k)} d[m_k, j],     m_k = a_k + floor((b_k - a_k) / 2)

    (each interval costed by the dissimilarity of its points to its middle point ``m_k``), with the sizes of their
    code: with ``lo = floor(n / 2K)`` and ``hi = ceil(3n / 2K)``, every interval after the first holds between
    ``lo`` and ``hi`` points and the first at least ``lo + 1`` (their recursion bounds the first interval from below
    only). Solved exactly by dynamic programming.

    Args:
        dissimilarity (`torch.Tensor`): ``[n, n]`` the dissimilarity ``d[m, j]`` of point ``j`` to centre ``m``.
        num_stages (`int`): ``K``, in ``[1, n]``.

    Returns:
        `list[int]`: the ``K - 1`` interval starts (point indices), strictly increasing.
    """
    d = torch.as_tensor(dissimilarity, dtype=torch.float64).cpu().numpy()
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 1:
        raise ValueError(f"`dissimilarity` must be a square [n, n] matrix, got shape {tuple(d.shape)}.")
    n = d.shape[0]
    check_num_stages(num_stages, n, "number of points")
    if num_stages == 1:
        return []
    lo, hi = interval_size_limits(n, num_stages)
    prefix = np.zeros((n, n + 1))
    prefix[:, 1:] = d.cumsum(1)
    idx = np.arange(n + 1)
    a, b = idx[:, None], idx[None, :]
    centre = np.minimum(a + (b - a) // 2, n - 1)
    cost = prefix[centre, b] - prefix[centre, a]
    size = b - a
    admissible = (size >= lo) & (size <= hi) & (a > 0) | (size >= lo + 1) & (a == 0)
    return best_partition(np.where(admissible & (size > 0), -cost, -np.inf), num_stages)

"""TIES merging of per-stage task vectors (trim, elect sign, disjoint mean), as in the DeMe authors' utilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .task_vectors import TaskVector


def trim_threshold(tau: Mapping[str, torch.Tensor], density: float) -> float:
    r"""
    The magnitude threshold that keeps the top ``density`` fraction of one task vector's entries, over ALL of its
    tensors at once (the authors' ``topk_values_mask`` on the flattened model): with ``d`` entries and
    ``k = int(d density)``, the threshold is the ``(d - k)``-th smallest ``|tau|`` and entries ``>=`` it are kept
    (``-inf``, keep everything, when ``k = d``).
    """
    flat = torch.cat([t.detach().abs().flatten().float() for t in tau.values()])
    d = flat.numel()
    keep = int(d * density)
    return float("-inf") if keep >= d else float(flat.kthvalue(d - keep).values)


def ties_merge(
    taus: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    density: float = 0.2,
    disjoint: Literal["mean", "sum"] = "mean",
) -> TaskVector:
    r"""
    TIES merging (Yadav et al., 2023) of weighted task vectors, following the DeMe authors' ``ties_merging``:

    1. trim: keep the top ``density`` fraction of each ``tau_k`` by magnitude (`trim_threshold`, over the whole model),
       giving ``hat tau_k``;
    2. elect: ``gamma = sign(sum_k w_k hat tau_k)`` per entry; where that sum is 0, the sign of the sum of ``gamma``
       over the whole model (the majority sign);
    3. disjoint merge: per entry, the mean (or sum) of the ``w_k hat tau_k`` whose sign agrees with ``gamma``
       (the mean over the agreeing non-zero entries, 0 where none agrees).

    With equal weights ``w_k = lambda`` this is TIES with scaling ``lambda``; with ``density = 1`` and
    ``disjoint="sum"`` and no sign conflict it is task arithmetic.

    Args:
        taus (`Sequence[Mapping[str, torch.Tensor]]`): One task vector per stage, same keys.
        weights (`Sequence[float]`): ``w_k``, one per task vector.
        density (`float`, defaults to 0.2): Fraction of entries kept by the trim, in ``(0, 1]`` (TIES' ``k = 20%``).
        disjoint (`str`, defaults to ``"mean"``): ``"mean"`` (TIES) or ``"sum"`` of the agreeing entries.
    """
    if len(weights) != len(taus):
        raise ValueError(f"`weights` must hold one weight per task vector ({len(taus)}), got {list(weights)}.")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density!r}.")
    if disjoint not in ("mean", "sum"):
        raise ValueError(f"`disjoint` must be 'mean' or 'sum', got {disjoint!r}.")
    thresholds = [trim_threshold(tau, density) for tau in taus]
    keys = list(taus[0])

    def trimmed(name: str) -> torch.Tensor:
        rows = [w * t[name].double() * (t[name].abs().float() >= th) for t, w, th in zip(taus, weights, thresholds)]
        return torch.stack(rows)

    majority = torch.sign(sum(torch.sign(trimmed(n).sum(0)).sum() for n in keys))
    merged = {}
    for name in keys:
        rows = trimmed(name)
        sign = torch.sign(rows.sum(0))
        sign[sign == 0] = majority
        agree = rows * torch.where(sign > 0, rows > 0, rows < 0)
        total = agree.sum(0)
        merged[name] = total / (agree != 0).sum(0).clamp_min(1) if disjoint == "mean" else total
    return merged

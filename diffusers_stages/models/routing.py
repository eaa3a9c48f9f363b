"""Stage routing shared by every model that holds one expert per stage (multi-decoder UNets, per-stage UNets).

Three ways to find the stage of a batch, from cheapest to most general:

- the caller knows it (``stage=k`` in the multi-decoder models' ``forward``): nothing is computed;
- one timestep for the whole batch under `torch.compile`: `select_stage` chooses the expert in the graph with nested
  ``torch.cond`` (no graph break);
- otherwise `host_stage_indices` reads the timesteps on the host (free for Python numbers and CPU tensors, one
  device sync for an accelerator tensor) and groups the samples by stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch

from ..stages import TimestepStages


class StageRoutingMixin:
    """``num_stages``, ``stages`` and ``stage_index`` from ``config.stage_boundaries`` (in the model's timestep units)."""

    @property
    def num_stages(self) -> int:
        """The number of stages ``K`` (= number of experts)."""
        return len(self.config.stage_boundaries) + 1

    @property
    def stages(self) -> TimestepStages | None:
        """The stages as a `TimestepStages` when the boundaries are integer timesteps, else ``None``."""
        bounds = self.config.stage_boundaries
        if not all(float(b).is_integer() for b in bounds):
            return None
        return TimestepStages([int(b) for b in bounds], num_train_timesteps=self.config.num_train_timesteps)

    def stage_index(self, timestep: Union[int, float, torch.Tensor]) -> torch.Tensor:
        """
        Stage of each timestep, ``bucketize(timestep, stage_boundaries, right=True)``: the number of boundaries
        ``b <= t``. Works for integer and float timesteps (in the units the model receives).
        """
        t = torch.as_tensor(timestep)
        bounds = torch.tensor(self.config.stage_boundaries, dtype=_compare_dtype(t), device=t.device)
        return torch.bucketize(t.to(bounds.dtype), bounds, right=True)

    def host_stage_indices(self, timestep: Union[int, float, torch.Tensor]) -> list[int]:
        """
        `stage_index` computed on the host (the number of boundaries ``b <= t``, in Python floats): a list with one
        stage per timestep. Reading an accelerator tensor's values is a device sync; Python numbers cost nothing
        (and `torch.compile` folds them, as plain Python).
        """
        values = timestep.reshape(-1).tolist() if torch.is_tensor(timestep) else [timestep]
        bounds = self.config.stage_boundaries
        return [sum(b <= float(v) for b in bounds) for v in values]

    def check_stage(self, stage: int) -> int:
        """``stage`` if it is an int in ``[0, num_stages)``, else a `ValueError`."""
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"`stage` must be an int in [0, {self.num_stages}), got {stage!r}.")
        return stage

    def select_stage(self, timestep: torch.Tensor, run: Callable[[int], torch.Tensor]) -> torch.Tensor:
        r"""
        ``run(k)`` for the stage ``k`` of a one-element ``timestep``, chosen inside the graph: a binary search over
        the boundaries with nested ``torch.cond`` (``t >= b_m`` picks the stages above ``m``), so that
        `torch.compile` traces every expert once and needs no graph break. Meant for compiled code: in eager mode
        ``torch.cond`` compiles itself on each call, so eager callers route with `host_stage_indices`.
        """
        t = timestep.reshape(())
        t = t.to(_compare_dtype(t))
        bounds = self.config.stage_boundaries

        def between(lo: int, hi: int) -> torch.Tensor:
            if hi - lo == 1:
                return run(lo)
            mid = (lo + hi) // 2
            return torch.cond(t >= bounds[mid - 1], lambda: between(mid, hi), lambda: between(lo, mid))

        return between(0, self.num_stages)


def _compare_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for exact comparisons with the boundaries, float32 on MPS (which has no float64)."""
    return torch.float32 if t.device.type == "mps" else torch.float64

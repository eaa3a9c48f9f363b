"""Stage routing shared by every model that holds one expert per stage (multi-decoder UNets, per-stage UNets)."""

from __future__ import annotations

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
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        bounds = torch.tensor(self.config.stage_boundaries, dtype=dtype, device=t.device)
        return torch.bucketize(t.to(dtype), bounds, right=True)

"""Timestep stages: K contiguous ranges of the training time grid ``[0, T)``.

Stage ``k`` covers the discrete timesteps ``boundaries[k-1] <= t < boundaries[k]`` (with ``boundaries[-1] = 0``
and ``boundaries[K-1] = T`` implied). Stage 0 is the least noisy stage. The interior boundaries are the only
state and are stored as JSON (``stages.json``) next to a model.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

STAGES_CONFIG_NAME = "stages.json"


class TimestepStages(ConfigMixin):
    r"""
    Contiguous stages over the discrete training time grid ``[0, num_train_timesteps)``.

    Args:
        boundaries (`list[int]`):
            The ``K - 1`` interior boundaries, strictly increasing, each in ``(0, num_train_timesteps)``.
            Stage ``k`` is ``[boundaries[k-1], boundaries[k])``; an empty list means a single stage.
        num_train_timesteps (`int`, defaults to 1000):
            The length ``T`` of the training time grid.
        method (`str`, *optional*):
            How the boundaries were found (``"uniform"``, ``"optimal_denoiser"``, ...), kept for the record.
    """

    config_name = STAGES_CONFIG_NAME

    @register_to_config
    def __init__(self, boundaries: list[int], num_train_timesteps: int = 1000, method: str | None = None):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be a positive int, got {num_train_timesteps!r}.")
        boundaries = list(boundaries)
        for b in boundaries:
            if not isinstance(b, numbers.Real) or isinstance(b, bool) or not float(b).is_integer():
                raise ValueError(f"`boundaries` must be integer timesteps, got {boundaries!r}.")
        boundaries = [int(b) for b in boundaries]
        if any(b <= 0 or b >= num_train_timesteps for b in boundaries):
            raise ValueError(
                f"`boundaries` must lie strictly inside (0, {num_train_timesteps}) so that no stage is empty, "
                f"got {boundaries}."
            )
        if any(b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])):
            raise ValueError(f"`boundaries` must be strictly increasing (no duplicates), got {boundaries}.")
        self.boundaries = boundaries
        self.num_train_timesteps = num_train_timesteps

    # ------------------------------------------------------------------ construction
    @classmethod
    def uniform(cls, num_stages: int, num_train_timesteps: int = 1000) -> TimestepStages:
        """``num_stages`` stages of (nearly) equal length: boundary ``k`` is ``round(k T / K)``."""
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"`num_stages` must be a positive int, got {num_stages!r}.")
        if num_stages > num_train_timesteps:
            raise ValueError(
                f"`num_stages` ({num_stages}) cannot exceed `num_train_timesteps` ({num_train_timesteps})."
            )
        bounds = [round(k * num_train_timesteps / num_stages) for k in range(1, num_stages)]
        return cls(boundaries=bounds, num_train_timesteps=num_train_timesteps, method="uniform")

    @classmethod
    def from_fractions(
        cls, fractions: list[float], num_train_timesteps: int = 1000, method: str | None = None
    ) -> TimestepStages:
        """From boundaries in continuous time ``tau in (0, 1)`` (the papers' notation): ``b = round(tau T)``."""
        if any(not 0.0 < f < 1.0 for f in fractions):
            raise ValueError(f"`fractions` must lie strictly inside (0, 1), got {fractions}.")
        return cls([round(f * num_train_timesteps) for f in fractions], num_train_timesteps, method)

    # ------------------------------------------------------------------ queries
    @property
    def num_stages(self) -> int:
        return len(self.boundaries) + 1

    def __len__(self) -> int:
        return self.num_stages

    def __repr__(self) -> str:
        return f"TimestepStages(boundaries={self.boundaries}, num_train_timesteps={self.num_train_timesteps})"

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, TimestepStages)
            and self.boundaries == other.boundaries
            and self.num_train_timesteps == other.num_train_timesteps
        )

    @property
    def edges(self) -> list[int]:
        """All ``K + 1`` edges ``[0, b_1, ..., b_{K-1}, T]``."""
        return [0, *self.boundaries, self.num_train_timesteps]

    def timestep_range(self, stage: int) -> tuple[int, int]:
        """The half-open range ``[start, end)`` of training timesteps in ``stage``."""
        self._check_stage(stage)
        return self.edges[stage], self.edges[stage + 1]

    def stage_index(self, timesteps: Union[int, float, torch.Tensor]) -> torch.Tensor:
        """Stage of each timestep (vectorised; fractional timesteps are allowed): ``#{b : b <= t}``. NaN is refused."""
        t = torch.as_tensor(timesteps)
        if t.is_floating_point() and bool(t.isnan().any()):
            raise ValueError(f"`timesteps` must not be NaN, got {timesteps}.")
        bounds = torch.tensor(self.boundaries, dtype=t.dtype if t.is_floating_point() else torch.long, device=t.device)
        return torch.bucketize(t, bounds, right=True)

    def stage_index_from_sigma(self, sigma: Union[float, torch.Tensor], sigmas: torch.Tensor) -> torch.Tensor:
        """
        Stage of a noise level. ``sigmas`` is the increasing table of the ``T`` training sigmas (sigma of timestep
        ``t`` at index ``t``, e.g. ``sqrt((1 - abar) / abar)``); ``sigma`` is mapped to the fractional timestep by
        linear interpolation in ``log sigma`` and then to its stage.
        """
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if sigmas.numel() != self.num_train_timesteps:
            raise ValueError(
                f"`sigmas` must hold one sigma per training timestep ({self.num_train_timesteps}), "
                f"got {sigmas.numel()}."
            )
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("`sigmas` must be strictly increasing with the timestep.")
        s = torch.as_tensor(sigma, dtype=torch.float64)
        log_table, log_s = sigmas.log(), s.clamp_min(sigmas[0]).log()
        idx = torch.searchsorted(log_table, log_s).clamp(1, len(sigmas) - 1)
        lo, hi = log_table[idx - 1], log_table[idx]
        t = (idx - 1) + ((log_s - lo) / (hi - lo)).clamp(0, 1)
        return self.stage_index(t)

    def sigma_boundaries(self, sigmas: torch.Tensor) -> list[float]:
        """The interior boundaries as noise levels: ``sigmas[b]`` for each boundary ``b``."""
        sigmas = torch.as_tensor(sigmas).flatten()
        return [float(sigmas[b]) for b in self.boundaries]

    def sample_timesteps(
        self,
        stage: Union[int, torch.Tensor],
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        device: Union[str, torch.device] = "cpu",
    ) -> torch.Tensor:
        """
        Uniform random training timesteps inside a stage. ``stage`` is one int (then ``batch_size`` samples are
        drawn from it) or a tensor of per-sample stages (one timestep each).
        """
        stages = torch.as_tensor(stage, dtype=torch.long)
        if stages.ndim == 0:
            if batch_size is None or batch_size < 1:
                raise ValueError("`batch_size` must be a positive int when `stage` is a single stage.")
            stages = stages.expand(batch_size)
        if stages.numel() and (int(stages.min()) < 0 or int(stages.max()) >= self.num_stages):
            raise ValueError(f"`stage` must be in [0, {self.num_stages}), got {stage}.")
        edges = torch.tensor(self.edges, dtype=torch.long)
        start, length = edges[stages], edges[stages + 1] - edges[stages]
        u = torch.rand(stages.shape, generator=generator, dtype=torch.float64)
        return (start + (u * length).long().clamp_max(length - 1)).to(device)

    def adapter_name(self, stage: int) -> str:
        """The name of the per-stage adapter / expert: ``"stage{k}"``."""
        self._check_stage(stage)
        return f"stage{stage}"

    @property
    def adapter_names(self) -> list[str]:
        return [self.adapter_name(k) for k in range(self.num_stages)]

    def _check_stage(self, stage: int) -> None:
        if not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"`stage` must be an int in [0, {self.num_stages}), got {stage!r}.")

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``stages.json`` into ``save_directory`` atomically (temporary file, then rename)."""
        from .utils import write_text

        path = os.path.join(save_directory, self.config_name)
        write_text(self.to_json_string(), path)
        return path

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], subfolder: str | None = None, **kwargs
    ) -> TimestepStages:
        """Load from a folder (or Hub repo) holding ``stages.json``, or from a path to the JSON file itself."""
        path = os.fspath(pretrained_model_name_or_path)
        try:
            if os.path.isfile(path):
                with open(path) as f:
                    config = json.load(f)
            else:
                config = cls.load_config(path, subfolder=subfolder, **kwargs)
            if not isinstance(config, dict) or "boundaries" not in config:
                raise ValueError("it has no `boundaries`")
            return cls.from_config(config)
        except (ValueError, TypeError, OSError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a valid stages file ({STAGES_CONFIG_NAME}): {e}") from e

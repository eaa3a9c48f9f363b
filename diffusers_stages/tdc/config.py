"""`TDCConfig`: the options of a TDC run (the training ones plus grouping, pruning and the compute split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..training.config import NoiseProcess, TrainingConfig, _field


@dataclass
class TDCConfig(TrainingConfig):
    r"""
    TDC: two-stage divide-and-conquer training with proxy-based pruning, one run of
    :func:`~diffusers_stages.tdc.run_tdc`.

    Every field of :class:`~diffusers_stages.training.TrainingConfig` (the phase-1 and phase-2 trainer runs use
    them), with TDC's own defaults ``noise_process="ddpm"``, ``output_dir="outputs/tdc"``, ``validation_steps=0``,
    plus the fields below. ``max_train_steps`` is the whole compute budget in unified-model steps.

    Args:
        phase1_fraction (`float`, defaults to 0.5): Share of ``max_train_steps`` spent on the unified model; in (0, 1).
        num_groups (`int`, defaults to 3): Timestep groups (experts).
        prune_k (`float`, defaults to 0.5): The smallest expert's MAC budget as a fraction of the unified model's;
            in (0, 1].
        full_size_at (`"low_noise"` or `"high_noise"`, defaults to `"low_noise"`): Which group keeps full size.
        grouping_grid_size (`int`, defaults to 25): Timesteps measured by the gradient grouping.
        grouping_images (`int`, defaults to 128): Images for the gradient grouping.
        difficulty_weight (`float`, defaults to 0.5): Weight of the difficulty in the grouping; in
            [0, 1].
        grouping_difficulty (`"loss"` or `"snr"`, defaults to `"loss"`): The difficulty in the grouping: the
            measured per-timestep log-loss (ours) or the paper's ``-log SNR_t``.
        width_ratio (`float`, defaults to 0.25): Fraction of a level's channels one pruning action removes; in (0, 1).
        proxy_finetune_steps (`int`, defaults to 2): Finetune steps before a pruning candidate's proxy loss.
        proxy_heldout_images (`int`, defaults to 128): Held-out images for the proxy loss.
    """

    noise_process: NoiseProcess = _field("ddpm", "TDC groups timesteps of an eps/VP model: 'ddpm' only")
    output_dir: str = _field("outputs/tdc", "pipeline, phase folders, checkpoints and logs")
    validation_steps: int = _field(0, "save a sample grid every N steps (0: never)")
    phase1_fraction: float = _field(0.5, "share of --max_train_steps spent on the unified model")
    num_groups: int = _field(3, "timestep groups (experts)")
    prune_k: float = _field(0.5, "the smallest expert's MAC budget, as a fraction of the unified")
    full_size_at: Literal["low_noise", "high_noise"] = _field("low_noise", "which group keeps full size")
    grouping_grid_size: int = _field(25, "timesteps measured by the gradient grouping")
    grouping_images: int = _field(128, "images for the gradient grouping")
    difficulty_weight: float = _field(0.5, "weight of the difficulty in the grouping")
    grouping_difficulty: Literal["loss", "snr"] = _field("loss", "difficulty: 'loss' (ours) or 'snr' (the paper's)")
    width_ratio: float = _field(0.25, "fraction of a level's channels one pruning action removes")
    proxy_finetune_steps: int = _field(2, "finetune steps before a candidate's proxy loss")
    proxy_heldout_images: int = _field(128, "held-out images for the proxy loss")

    def __post_init__(self):
        super().__post_init__()
        if self.noise_process != "ddpm":
            raise ValueError(
                f"TDC groups timesteps of an eps/VP model: `noise_process` must be 'ddpm', got {self.noise_process!r}."
            )
        if self.model_type != "unified":
            raise ValueError(
                f"TDC's phase 1 trains one unified model: `model_type` must be 'unified', got {self.model_type!r}."
            )
        for name, low in {"num_groups": 1, "grouping_grid_size": 1, "grouping_images": 1, "proxy_heldout_images": 1,
                          "proxy_finetune_steps": 0}.items():  # fmt: skip
            if getattr(self, name) < low:
                raise ValueError(f"`{name}` must be >= {low}, got {getattr(self, name)}.")
        if not 0 < self.phase1_fraction < 1:
            raise ValueError(f"`phase1_fraction` must lie in (0, 1), got {self.phase1_fraction}.")
        if not 0 < self.prune_k <= 1:
            raise ValueError(f"`prune_k` must lie in (0, 1], got {self.prune_k}.")
        if not 0 < self.width_ratio < 1:
            raise ValueError(f"`width_ratio` must lie in (0, 1), got {self.width_ratio}.")
        if not 0 <= self.difficulty_weight <= 1:
            raise ValueError(f"`difficulty_weight` must lie in [0, 1], got {self.difficulty_weight}.")

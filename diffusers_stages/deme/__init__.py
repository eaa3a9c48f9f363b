"""Decouple-then-Merge: per-stage adapters, DeMe losses and channel projection, merging back into one UNet."""

from .adapters import StageLoraAdapters, base_fingerprint, read_lora_file, read_stage_adapters, write_lora_file
from .config import DeMeJobConfig, StageLoraConfig, StageMergeConfig
from .losses import DeMeLossOutput, deme_loss, deme_training_step, sample_deme_levels, sample_deme_timesteps
from .merge import StageMergeOutput, merge_stages
from .merging import (
    MergeSearchOutput,
    grid_search_merge_weights,
    heldout_denoising_loss,
    lora_delta,
    merge_stage_adapter_files,
    merge_stage_adapters,
)
from .projection import ChannelProjection
from .training import train_stage_lora

__all__ = [
    "ChannelProjection",
    "DeMeJobConfig",
    "DeMeLossOutput",
    "MergeSearchOutput",
    "StageLoraAdapters",
    "StageLoraConfig",
    "StageMergeConfig",
    "StageMergeOutput",
    "base_fingerprint",
    "deme_loss",
    "deme_training_step",
    "grid_search_merge_weights",
    "heldout_denoising_loss",
    "lora_delta",
    "merge_stage_adapter_files",
    "merge_stage_adapters",
    "merge_stages",
    "read_lora_file",
    "read_stage_adapters",
    "sample_deme_levels",
    "sample_deme_timesteps",
    "train_stage_lora",
    "write_lora_file",
]

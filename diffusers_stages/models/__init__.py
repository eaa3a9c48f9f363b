"""Multi-decoder U-Nets (one shared encoder, one decoder per timestep stage), per-stage experts, profiling."""

from .stage_experts import StageExpertsUNet
from .unet_2d_condition_multi_decoder import MultiDecoderUNet2DConditionModel
from .unet_2d_multi_decoder import MultiDecoderUNet2DModel

__all__ = ["MultiDecoderUNet2DConditionModel", "MultiDecoderUNet2DModel", "StageExpertsUNet"]

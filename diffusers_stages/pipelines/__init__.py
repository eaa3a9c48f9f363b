"""Stage-aware pipelines: at every sampling step the expert of the step's timestep stage."""

from .lora_switcher import StageLoraSwitcher
from .pipeline_stage_aware_image import StageAwareImagePipeline
from .pipeline_stage_aware_stable_diffusion import (
    StageAwareStableDiffusionImg2ImgPipeline,
    StageAwareStableDiffusionInpaintPipeline,
    StageAwareStableDiffusionPipeline,
)
from .pipeline_stage_aware_stable_diffusion_xl import StageAwareStableDiffusionXLPipeline
from .saving import load_pipeline, save_pipeline
from .stage_experts import StageExpertsMixin
from .stage_switching import switch_stage_experts

__all__ = [
    "StageAwareImagePipeline",
    "StageAwareStableDiffusionImg2ImgPipeline",
    "StageAwareStableDiffusionInpaintPipeline",
    "StageAwareStableDiffusionPipeline",
    "StageAwareStableDiffusionXLPipeline",
    "StageExpertsMixin",
    "StageLoraSwitcher",
    "load_pipeline",
    "save_pipeline",
    "switch_stage_experts",
]

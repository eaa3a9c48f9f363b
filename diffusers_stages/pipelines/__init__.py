"""Stage-aware pipelines: at every sampling step the expert of the step's timestep stage."""

from .pipeline_stage_aware_image import StageAwareImagePipeline
from .pipeline_stage_aware_stable_diffusion import StageAwareStableDiffusionPipeline
from .saving import load_pipeline, save_pipeline
from .stage_experts import StageExpertsMixin, StageLoraSwitcher

__all__ = [
    "StageAwareImagePipeline",
    "StageAwareStableDiffusionPipeline",
    "StageExpertsMixin",
    "StageLoraSwitcher",
    "load_pipeline",
    "save_pipeline",
]

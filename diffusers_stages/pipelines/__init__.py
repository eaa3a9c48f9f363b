"""Stage-aware pipelines."""

from .pipeline_stage_aware_image import StageAwareImagePipeline
from .saving import save_pipeline

__all__ = ["StageAwareImagePipeline", "save_pipeline"]

"""Single-file custom pipeline: ``DiffusionPipeline.from_pretrained(repo, custom_pipeline="<this file or its Hub
path>")`` gives a `StageAwareImagePipeline` (unconditional pixel-space sampling with per-stage experts, any
scheduler). It needs ``pip install diffusers-stages``; the implementation lives there, this file only names the class
for diffusers' custom-pipeline loader.
"""

from diffusers_stages.pipelines.pipeline_stage_aware_image import StageAwareImagePipeline

__all__ = ["StageAwareImagePipeline"]

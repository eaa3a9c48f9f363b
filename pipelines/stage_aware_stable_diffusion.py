"""Single-file custom pipeline: ``DiffusionPipeline.from_pretrained(repo, custom_pipeline="<this file or its Hub
path>")`` gives a `StageAwareStableDiffusionPipeline` (per-stage LoRA adapters fused at stage boundaries, per-stage
UNets, multi-decoder UNets). It needs ``pip install diffusers-stages``; the implementation lives there, this file
only names the class for diffusers' custom-pipeline loader.
"""

from diffusers_stages.pipelines.pipeline_stage_aware_stable_diffusion import StageAwareStableDiffusionPipeline

__all__ = ["StageAwareStableDiffusionPipeline"]

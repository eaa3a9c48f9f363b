"""Single-file custom pipeline: ``DiffusionPipeline.from_pretrained(repo, custom_pipeline="<this file or its Hub
path>")`` gives a `StageAwareStableDiffusionInpaintPipeline` (inpainting with per-stage experts switched by a UNet forward
pre-hook around the stock ``__call__``). It needs ``pip install diffusers-stages``; the implementation lives there,
this file only names the class for diffusers' custom-pipeline loader.
"""

from diffusers_stages.pipelines.pipeline_stage_aware_stable_diffusion import StageAwareStableDiffusionInpaintPipeline

__all__ = ["StageAwareStableDiffusionInpaintPipeline"]

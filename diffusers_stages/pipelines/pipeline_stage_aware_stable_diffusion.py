"""Stable Diffusion (text-to-image, image-to-image, inpainting) with one expert per timestep stage."""

from __future__ import annotations

from diffusers import (  # noqa: F401 (`ModelMixin` / `SchedulerMixin` here: DiffusionPipeline loading)
    ModelMixin,
    SchedulerMixin,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from .stage_experts import StageExpertsMixin


class StageAwareStableDiffusionPipeline(StageExpertsMixin, StableDiffusionPipeline):
    r"""
    `StableDiffusionPipeline` whose every denoising step uses the expert of the step's timestep stage:

    - ``unet`` a `MultiDecoderUNet2DConditionModel` or a `StageExpertsUNet` of `UNet2DConditionModel` experts: the
      model routes by itself;
    - ``unet`` a `UNet2DConditionModel` with per-stage LoRA adapters (`load_stage_adapters`, from the folder of
      ``train_stage_lora.py``: DeMe "before merge"): the stage's adapter is fused into the weights at each stage
      boundary and the weights restored exactly after it (``lora_mode="fuse"``), or applied unfused every step.

    The stage boundaries come from the experts (``stages.json`` of the adapters, ``stage_boundaries`` of the model).
    ``__call__`` is `StableDiffusionPipeline`'s own, run inside `StageExpertsMixin.stage_experts` (a UNet forward
    pre-hook switches the adapter), so every stock argument works (``cross_attention_kwargs``, ``guidance_rescale``,
    ``clip_skip``, ``ip_adapter_image``, ``timesteps``, ``sigmas``, ...), plus ``lora_mode``.
    ``stage_adapters_subfolder`` is set by `save_pretrained` when adapters were saved.
    """

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        stage_adapters_subfolder: str | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_to_config(stage_adapters_subfolder=stage_adapters_subfolder)


class StageAwareStableDiffusionImg2ImgPipeline(StageExpertsMixin, StableDiffusionImg2ImgPipeline):
    r"""
    `StableDiffusionImg2ImgPipeline` whose every UNet call uses the expert of its timestep's stage (see
    `StageAwareStableDiffusionPipeline`); components and call arguments are the stock ones, plus ``lora_mode``.
    Adapters saved with the pipeline (``stage_adapters/``) are reloaded by `from_pretrained` from a local folder.
    """


class StageAwareStableDiffusionInpaintPipeline(StageExpertsMixin, StableDiffusionInpaintPipeline):
    r"""
    `StableDiffusionInpaintPipeline` whose every UNet call uses the expert of its timestep's stage (see
    `StageAwareStableDiffusionPipeline`); components and call arguments are the stock ones, plus ``lora_mode``.
    Adapters saved with the pipeline (``stage_adapters/``) are reloaded by `from_pretrained` from a local folder.
    """

"""Stable Diffusion XL with one expert per timestep stage."""

from __future__ import annotations

from diffusers import ModelMixin, SchedulerMixin, StableDiffusionXLPipeline  # noqa: F401 (loading)

from .stage_experts import StageExpertsMixin


class StageAwareStableDiffusionXLPipeline(StageExpertsMixin, StableDiffusionXLPipeline):
    r"""
    `StableDiffusionXLPipeline` whose every UNet call uses the expert of its timestep's stage: per-stage LoRA adapters
    on the UNet (`load_stage_adapters`), fused at stage boundaries by a UNet forward pre-hook, or a UNet that routes
    by itself. Components and call arguments are the stock ones (``denoising_end``, ``guidance_rescale``, ...), plus
    ``lora_mode``. Adapters saved with the pipeline (``stage_adapters/``) are reloaded by `from_pretrained` from a
    local folder.
    """

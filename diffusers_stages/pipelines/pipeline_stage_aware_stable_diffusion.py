"""Text-to-image Stable Diffusion with one expert per timestep stage (per-stage LoRA, per-stage UNets, multi-decoder)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Union

import torch
from diffusers import ModelMixin, SchedulerMixin, StableDiffusionPipeline  # noqa: F401 (loading)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

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
    Any diffusers scheduler works, the FDM ones included; the loop is the stock one (classifier-free guidance
    ``eps_u + s (eps_c - eps_u)``). Components and call arguments are `StableDiffusionPipeline`'s, plus
    ``lora_mode``; ``stage_adapters_subfolder`` is set by `save_pretrained` when adapters were saved.
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

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: Union[str, list[str]] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Union[torch.Generator, list[torch.Generator]] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        lora_mode: Literal["fuse", "unfused"] = "fuse",
    ):
        r"""
        Args:
            prompt (`str` or `list[str]`): The prompt(s); a list gives a batch.
            height (`int`, *optional*), width (`int`, *optional*): Image size; defaults to the UNet's
                ``sample_size * vae_scale_factor``.
            num_inference_steps (`int`, defaults to 50): Scheduler steps.
            guidance_scale (`float`, defaults to 7.5): Classifier-free guidance ``s``; ``<= 1`` disables it.
            negative_prompt (`str` or `list[str]`, *optional*): What to guide away from.
            num_images_per_prompt (`int`, defaults to 1): Images per prompt.
            eta (`float`, defaults to 0.0): DDIM's ``eta`` (ignored by other schedulers).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For reproducible sampling.
            latents (`torch.Tensor`, *optional*): Starting noise ``z`` (unscaled).
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): Precomputed text embeddings.
            output_type (`"pil"`, `"np"`, `"pt"` or `"latent"`, defaults to `"pil"`): The output format.
            return_dict (`bool`, defaults to `True`): Return a `StableDiffusionPipelineOutput`, else a tuple.
            callback_on_step_end (`Callable`, *optional*): ``fn(pipe, i, t, kwargs) -> dict`` after every step, with
                the tensors named in ``callback_on_step_end_tensor_inputs``; it may replace them, and setting
                ``pipe._interrupt = True`` stops sampling. Component state is restored in every case.
            lora_mode (`"fuse"` or `"unfused"`, defaults to `"fuse"`): With stage adapters, merge the stage's adapter
                into the weights at each stage boundary, or apply it as a side branch at every step.

        Returns:
            [`StableDiffusionPipelineOutput`] or `tuple`: the images and the NSFW flags (``None`` without a checker).
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        size = self.unet.config.sample_size
        height = height or (size if isinstance(size, int) else size[0]) * self.vae_scale_factor
        width = width or (size if isinstance(size, int) else size[1]) * self.vae_scale_factor
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        self._load_saved_stage_adapters()
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.check_stage_timesteps(timesteps)
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                scale, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        self._num_timesteps = len(timesteps)
        with self.stage_experts(lora_mode) as select_expert, self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    break
                select_expert(t)
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    timestep_cond=timestep_cond,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                bar.update()

        if output_type == "latent":
            image, has_nsfw = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[
                0
            ]
            image, has_nsfw = self.run_safety_checker(image, device, prompt_embeds.dtype)
            do_denormalize = [True] * image.shape[0] if has_nsfw is None else [not n for n in has_nsfw]
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)

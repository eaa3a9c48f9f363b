"""Unconditional (or class-conditional) pixel-space sampling with any diffusers scheduler, FDM/EDM ones included."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Literal, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin  # noqa: F401 (loading)
from diffusers.utils.torch_utils import randn_tensor

from .stage_experts import StageExpertsMixin, write_custom_pipeline_entry


def accepts(function: Callable, name: str) -> bool:
    """Whether ``function`` takes an argument ``name`` (as diffusers' ``prepare_extra_step_kwargs`` checks ``eta``)."""
    return name in inspect.signature(function).parameters


class StageAwareImagePipeline(StageExpertsMixin, DiffusionPipeline):
    r"""
    Pixel-space pipeline for a `UNet2DModel`-like denoiser with one expert per timestep stage. The experts are a
    `MultiDecoderUNet2DModel` or a `StageExpertsUNet` (both route each sample to its stage's expert by themselves),
    or per-stage LoRA adapters on a `UNet2DModel` (`load_stage_adapters`; the stage's adapter is fused in at each
    stage boundary). Unlike diffusers' `DDPMPipeline`, the loop is the full scheduler contract:
    ``x_T = init_noise_sigma * z``, then per step ``x <- step(unet(scale_model_input(x, t), t), t, x)``, so
    sigma-space schedulers (EDM, FDM-EDM, Heun) work too.

    Args:
        unet: the denoiser, called as ``unet(sample, timestep, class_labels=...)``.
        scheduler: any diffusers scheduler.
        stage_adapters_subfolder (`str`, *optional*): set by `save_pretrained` when stage adapters were saved.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler, stage_adapters_subfolder: str | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(stage_adapters_subfolder=stage_adapters_subfolder)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: Union[torch.Generator, list[torch.Generator]] | None = None,
        class_labels: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        lora_mode: Literal["fuse", "unfused"] = "fuse",
    ):
        r"""
        Args:
            batch_size (`int`): number of images.
            num_inference_steps (`int`): solver steps (a Heun scheduler evaluates the model about twice per step).
            generator (`torch.Generator`, *optional*): for reproducible noise.
            class_labels (`torch.Tensor`, *optional*): per-image labels for a class-conditional UNet.
            latents (`torch.Tensor`, *optional*): the starting noise ``z`` (unscaled), shape ``[B, C, H, W]``.
            output_type (`str`): ``"pil"``, ``"np"`` or ``"pt"`` (``"pt"`` keeps ``[-1, 1]`` tensors scaled to [0, 1]).
            callback_on_step_end (`Callable`, *optional*): ``fn(pipe, i, t, kwargs) -> dict`` after every step; may
                replace ``latents``; setting ``pipe._interrupt = True`` stops sampling.
            lora_mode (`"fuse"` or `"unfused"`, defaults to `"fuse"`): with stage adapters, merge the stage's adapter
                into the weights at each stage boundary, or apply it as a side branch at every step.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        self.check_call_arguments({"batch_size": batch_size, "num_inference_steps": num_inference_steps})
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=latents.device).reshape(-1).expand(batch_size)
        self._load_saved_stage_adapters()
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        self.check_stage_timesteps(timesteps)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if accepts(self.scheduler.step, "generator") else {}
        unet_kwargs = {"class_labels": class_labels} if class_labels is not None else {}
        stages = self._stage_arguments(timesteps)
        self._interrupt = False
        with self.stage_experts(lora_mode):
            for i, t in enumerate(self.progress_bar(timesteps)):
                if self._interrupt:
                    break
                model_input = self.scheduler.scale_model_input(latents, t)
                model_output = self.unet(model_input, t, **unet_kwargs, **stages[i]).sample
                latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = out.pop("latents", latents)
        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _stage_arguments(self, timesteps: torch.Tensor) -> list[dict]:
        """
        Per step, the extra UNet argument ``{"stage": k}`` for a UNet whose ``forward`` takes ``stage`` (our
        multi-decoder UNets): the stages of the whole schedule are read on the host once (`host_stage_indices`, the
        model's own routing rule), so that a step runs its stage's decoder without reading the timestep (no device
        sync per step, no graph break under `torch.compile`). Empty dicts for any other UNet.
        """
        if not accepts(self.unet.forward, "stage"):
            return [{}] * len(timesteps)
        return [{"stage": k} for k in self.unet.host_stage_indices(timesteps)]

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """
        Save the pipeline (see `StageExpertsMixin.save_pretrained`) so that it loads the way users load pipelines:
        ``model_index.json`` names ``["pipeline", "StageAwareImagePipeline"]`` and ``pipeline.py`` sits in the folder,
        so ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` gives this class, and
        ``StageAwareImagePipeline.from_pretrained(folder)`` needs no flag. A stock ``DDPMPipeline.from_pretrained``
        of the folder refuses (it asks for ``trust_remote_code``) instead of sampling with the wrong loop.
        """
        super().save_pretrained(save_directory, **kwargs)
        write_custom_pipeline_entry(save_directory, type(self))

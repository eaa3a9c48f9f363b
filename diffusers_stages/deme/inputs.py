"""Data and model plumbing shared by ``training/train_stage_lora.py`` and ``training/merge_stage_adapters.py``.

Both Stable Diffusion pipeline folders (VAE + CLIP text encoder + `UNet2DConditionModel`) and unconditional pixel
pipelines (`UNet2DModel`, e.g. a saved `DDPMPipeline`, or a `MultiDecoderUNet2DModel`) are supported, with a DDPM-family
scheduler or an ``FDMEDMScheduler`` (sigma space, as the trainer saves for ``--noise_process edm|edm_fdm|vp_fdm|...``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from ..data import dataset_to_tensor, load_image_dataset
from ..stages import STAGES_CONFIG_NAME, TimestepStages
from ..training.components import is_multi_decoder, objective_for_scheduler
from ..training.distributed import key_seed, sample_generators


@dataclass
class BaseComponents:
    """The pieces of a pretrained pipeline that DeMe training needs (``vae`` / text parts are `None` for pixels).
    ``noise_scheduler`` is the training scheduler: a `DDPMScheduler`, or the base's ``FDMEDMScheduler`` (sigma
    space); ``objective`` its training objective (`objective_for_scheduler`)."""

    unet: torch.nn.Module
    noise_scheduler: Any
    vae: AutoencoderKL | None = None
    text_encoder: Any = None
    tokenizer: Any = None

    @property
    def is_text_to_image(self) -> bool:
        return self.text_encoder is not None

    @property
    def objective(self):
        return objective_for_scheduler(self.noise_scheduler)


def load_training_scheduler(path: str):
    """The base's training scheduler: its own FDM scheduler (``FDMEDMScheduler`` in sigma space, or a discrete FDM
    scheduler, whose `add_noise` is the FDM state ``s_t (x0 + sigma_t eps)``), else a `DDPMScheduler` from its
    scheduler config (any DDPM-family scheduler: DDPM, DDIM, PNDM, Euler, ...)."""
    from ..schedulers import FDMDDIMScheduler, FDMDPMSolverMultistepScheduler, FDMEDMScheduler

    scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    name = scheduler_config.get("_class_name")
    if name == FDMEDMScheduler.__name__:
        scheduler = FDMEDMScheduler.from_config(scheduler_config)
        objective_for_scheduler(scheduler)  # refuses a conditioning without a timestep grid
        return scheduler
    discrete_fdm = {cls.__name__: cls for cls in (FDMDDIMScheduler, FDMDPMSolverMultistepScheduler)}
    if name in discrete_fdm:  # finetune on the base's own kernel, not on DDPM's
        return discrete_fdm[name].from_config(scheduler_config)
    if "beta_schedule" not in scheduler_config:
        raise ValueError(
            f"`pretrained_model_name_or_path` {path}: DeMe finetunes with the base's training objective, but the "
            f"pipeline's scheduler {name} is neither an FDM scheduler nor a DDPM-family scheduler with betas (DDPM, "
            "DDIM, PNDM, Euler, ...)."
        )
    return DDPMScheduler.from_config(scheduler_config)


def pixel_unet_class(path: str):
    """The class named in ``path/unet/config.json``: one of our models (`MultiDecoderUNet2DModel`, ...) or
    diffusers' `UNet2DModel`."""
    from .. import models

    name = UNet2DModel.load_config(path, subfolder="unet").get("_class_name")
    return getattr(models, name) if isinstance(name, str) and hasattr(models, name) else UNet2DModel


def load_base_components(path: str) -> BaseComponents:
    """Load the UNet (and VAE, CLIP text encoder and tokenizer when present) and the training scheduler
    (`load_training_scheduler`)."""
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    noise_scheduler = load_training_scheduler(path)
    if "vae" in index and "text_encoder" in index:
        from transformers import CLIPTextModel, CLIPTokenizer

        return BaseComponents(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            noise_scheduler=noise_scheduler,
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        )
    if "unet" not in index:
        raise ValueError(f"`pretrained_model_name_or_path` {path} has no `unet` component in model_index.json.")
    unet = pixel_unet_class(path).from_pretrained(path, subfolder="unet")
    return BaseComponents(unet=unet, noise_scheduler=noise_scheduler)


def multi_decoder_stages(path: str, components: BaseComponents) -> TimestepStages | None:
    """The stages a multi-decoder base was trained with (``path/stages.json``, one per decoder), else `None`."""
    if not is_multi_decoder(components.unet) or not os.path.isfile(os.path.join(path, STAGES_CONFIG_NAME)):
        return None
    return TimestepStages.from_pretrained(path)


def load_training_images(
    source: str, components: BaseComponents, resolution: int, image_column=None, caption_column=None, max_samples=None
) -> tuple[torch.Tensor, list[str] | None]:
    """All images of ``source`` as ``[N, C, H, W]`` in ``[-1, 1]`` (RGB for the VAE), with their captions if any."""
    ds = load_image_dataset(
        source,
        resolution=resolution,
        image_column=image_column,
        caption_column=caption_column,
        max_samples=max_samples,
    )
    channels = 3 if components.vae is not None else components.unet.config.in_channels
    images = dataset_to_tensor(ds, resolution=resolution, channels=channels)
    captions = list(ds["text"]) if "text" in ds.column_names else None
    if components.is_text_to_image and captions is None:
        raise ValueError(f"The dataset {source} has no caption column; pass `--caption_column`.")
    return images, captions


def micro_batch_generators(
    seed: int, stage: int, step: int, micro: int, shard: slice
) -> tuple[torch.Generator, list[torch.Generator]]:
    """The generators of micro-batch ``micro`` of stage ``stage``'s step ``step``: pure functions of these indices
    and of the global sample index, never of the process (the trainer's scheme, `training.distributed`).

    Args:
        seed (`int`), stage (`int`), step (`int`), micro (`int`): The key, hashed by `key_seed` (unique for any
            number of processes, accumulation steps and steps).
        shard (`slice`): This process's samples ``[r B, (r + 1) B)`` of the micro-batch of ``N B`` samples.

    Returns:
        ``(shared, per_sample)``: the CPU generator every process seeds alike (image indices and timesteps of the
        whole micro-batch) and one CPU generator per sample of ``shard`` (its VAE latent sample, then its noise).
    """
    shared_seed = key_seed(seed, stage, step, micro)
    per_sample = sample_generators(shared_seed, shard.start, shard.stop - shard.start)
    return torch.Generator().manual_seed(shared_seed), per_sample


@torch.no_grad()
def encode_batch(
    components: BaseComponents,
    images: torch.Tensor,
    captions: list[str] | None,
    device,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    The UNet inputs of a batch: pixels (unconditional) or VAE latents ``z * scaling_factor`` (sampled from the latent
    distribution with ``generator``, one CPU generator per image or one for the batch, or its mean without one) plus
    the CLIP text embeddings of the captions.
    """
    x = images.to(device, dtype)
    if components.vae is None:
        return x, None
    dist = components.vae.encode(x).latent_dist
    z = dist.mean if generator is None else dist.sample(generator=generator)
    ids = components.tokenizer(
        captions,
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return z * components.vae.config.scaling_factor, components.text_encoder(ids)[0]

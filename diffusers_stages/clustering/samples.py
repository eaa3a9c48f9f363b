"""The training samples a clustering runs on: pixel images or VAE latents, as one float tensor ``[N, C, H, W]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from tqdm.auto import tqdm


def as_sample_tensor(data: Union[torch.Tensor, Sequence[torch.Tensor]], name: str = "data") -> torch.Tensor:
    """
    Check and stack training samples: a tensor ``[N, C, H, W]`` or a sequence of ``[C, H, W]`` tensors, all of one
    shape, ``N >= 1``. Raises a `ValueError` naming ``name`` for an empty dataset, mixed sizes or a wrong rank.
    """
    if data is None:
        raise ValueError(f"`{name}` is required: a tensor [N, C, H, W] of training samples.")
    if not isinstance(data, torch.Tensor):
        items = [torch.as_tensor(x) for x in data]
        if not items:
            raise ValueError(f"`{name}` is empty: at least one sample is needed.")
        shapes = sorted({tuple(x.shape) for x in items})
        if len(shapes) > 1:
            raise ValueError(f"`{name}` has mixed sample sizes {shapes}; resize them to one size first.")
        data = torch.stack(items)
    if data.ndim != 4:
        raise ValueError(f"`{name}` must be a tensor [N, C, H, W], got shape {tuple(data.shape)}.")
    if data.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: at least one sample is needed.")
    if not data.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (e.g. images in [-1, 1]), got {data.dtype}.")
    return data


@torch.no_grad()
def encode_latents(
    vae,
    images: torch.Tensor,
    batch_size: int = 64,
    sample_posterior: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    r"""
    Encode images with an `AutoencoderKL` in batches into the latents a latent diffusion model is trained on:
    ``z = (E(x) - shift_factor) * scaling_factor`` (``shift_factor`` is 0 when the VAE has none).

    Args:
        vae (`AutoencoderKL`): the autoencoder (any model whose ``encode`` returns a ``latent_dist``).
        images (`torch.Tensor`): ``[N, C, H, W]`` in ``[-1, 1]``; grayscale images are repeated to the VAE's
            input channels.
        batch_size (`int`, defaults to 64): images per forward pass.
        sample_posterior (`bool`, defaults to `False`): draw ``z`` from the posterior instead of taking its mode.
        generator (`torch.Generator`, *optional*): for ``sample_posterior``.
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        `torch.Tensor`: latents ``[N, latent_channels, h, w]`` (float32, on the CPU).
    """
    images = as_sample_tensor(images, "images")
    in_channels = vae.config.in_channels
    if images.shape[1] != in_channels:
        if images.shape[1] != 1:
            raise ValueError(f"`images` have {images.shape[1]} channels; the VAE expects {in_channels} (or 1).")
        images = images.expand(-1, in_channels, -1, -1)
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=not progress):
        x = images[i : i + batch_size].to(device=vae.device, dtype=vae.dtype)
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        out.append(((z - shift) * scale).float().cpu())
    return torch.cat(out)

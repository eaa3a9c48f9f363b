"""Stage switching for any pipeline: a UNet forward pre-hook activates the expert of each call's timestep stage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from ..deme.adapters import StageLoraAdapters
from .lora_switcher import StageLoraSwitcher


def _call_timestep(args: tuple, kwargs: dict):
    """The ``timestep`` argument of a UNet call (``unet(sample, timestep, ...)``)."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if len(args) < 2:
        raise ValueError("Stage switching needs the UNet to be called as `unet(sample, timestep, ...)`.")
    return args[1]


@contextmanager
def switch_stage_experts(
    unet: torch.nn.Module, adapters: StageLoraAdapters, lora_mode: Literal["fuse", "unfused"] = "fuse"
) -> Iterator[StageLoraSwitcher]:
    r"""
    Inside this context every call of ``unet`` first activates the adapter of its timestep's stage
    (:math:`k = \#\{b \in \text{boundaries} : b \le t\}`), so the pipeline's own ``__call__`` (any stock diffusers
    pipeline, with all of its arguments) samples with the right expert at every step. On exit, also after an
    exception or an interruption, the UNet's weights and active adapters are exactly what they were.

    A LoRA scale passed as ``cross_attention_kwargs={"scale": s}`` scales the stage's update as it scales any LoRA in
    diffusers (``W + s (alpha / r) B_k A_k``).

    Args:
        unet (`torch.nn.Module`): The UNet the adapters are attached to.
        adapters (`StageLoraAdapters`): The per-stage adapters.
        lora_mode (`"fuse"` or `"unfused"`, defaults to `"fuse"`): See `StageLoraSwitcher`.

    Example:

        >>> with switch_stage_experts(pipe.unet, adapters):
        ...     image = pipe("a cat", num_inference_steps=30).images[0]
    """
    if adapters.unet is not unet:
        raise ValueError("`adapters` are attached to another UNet than `unet`.")
    switcher = StageLoraSwitcher(adapters, lora_mode)
    stages = adapters.stages

    def pre_hook(module, args, kwargs):
        index = stages.stage_index(torch.as_tensor(_call_timestep(args, kwargs)).detach().reshape(-1).cpu())
        if not bool((index == index[0]).all()):
            raise ValueError(
                f"A UNet call mixes timesteps of stages {sorted(set(index.tolist()))}: per-stage LoRA adapters need "
                "one stage per call (a multi-decoder or `StageExpertsUNet` routes mixed batches)."
            )
        scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale", 1.0) if lora_mode == "fuse" else 1.0
        switcher.activate(int(index[0]), float(scale))

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield switcher
    finally:
        handle.remove()
        switcher.close()

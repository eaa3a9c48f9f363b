"""Per-stage LoRA adapters switched at stage boundaries, with the base weights restored bit-exactly afterwards."""

from __future__ import annotations

from typing import Literal

import torch
from peft.tuners.lora import LoraLayer

from ..deme.adapters import StageLoraAdapters, lora_scaling
from ..deme.merging import lora_delta

LORA_MODES = ("fuse", "unfused")


def _parent_slots(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, str, LoraLayer]]:
    """Every LoRA layer of ``unet`` with the module holding it and its attribute name there."""
    slots = []
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            slots.append((unet.get_submodule(parent_name), attr, module))
    return slots


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class StageLoraSwitcher:
    r"""
    Activates the adapter of one stage at a time during a pipeline call, and puts everything back on `close`.

    ``"fuse"``: at a stage boundary every adapted weight becomes ``W + s (alpha / r) B_k A_k`` (``s`` the LoRA scale of
    the call, 1 by default), computed in float64 from a copy of ``W`` taken when the switcher is created and cast to
    the weight's current dtype and device (so a UNet moved mid-call, e.g. by model CPU offload, keeps working). For the
    whole call every PEFT LoRA wrapper is replaced in its parent module by its base layer, so a step runs exactly the
    modules of the plain UNet (no per-layer adapter dispatch). `close` copies the saved weights back and puts the
    wrappers back: the base weights are bit-exactly what they were. Wrappers carrying hooks (DeMe channel projections
    on a targeted convolution) stay in place and are marked merged instead.

    ``"unfused"``: the stage's adapter is activated (weight ``s``) and runs as a side branch every step.

    Args:
        adapters (`StageLoraAdapters`): The per-stage adapters attached to the pipeline's UNet.
        lora_mode (`"fuse"` or `"unfused"`): Merge the active adapter into the weights, or keep it as a side branch.
    """

    def __init__(self, adapters: StageLoraAdapters, lora_mode: Literal["fuse", "unfused"]):
        if lora_mode not in LORA_MODES:
            raise ValueError(f"`lora_mode` must be one of {list(LORA_MODES)}, got {lora_mode!r}.")
        self.adapters, self.lora_mode = adapters, lora_mode
        self.slots = _parent_slots(adapters.unet)
        self.layers = [layer for _, _, layer in self.slots]
        if any(layer.merged for layer in self.layers):
            raise ValueError(
                "The `unet` has LoRA adapters merged into its weights; unmerge them before calling the pipeline."
            )
        unsupported = sorted({type(layer).__name__ for layer in self.layers if not len(layer.lora_A)})
        if lora_mode == "fuse" and unsupported:
            raise ValueError(
                f"`lora_mode='fuse'` supports Linear / Conv LoRA layers, not {unsupported}; use 'unfused'."
            )
        self.activation_changed = lora_mode == "unfused" or adapters.projection is not None
        self.active_before = adapters.active
        self.scaling = lora_scaling(adapters.config)
        self.snapshot: list[torch.Tensor] = []
        self.bypassed: list[tuple[torch.nn.Module, str, LoraLayer]] = []
        if lora_mode == "fuse":
            self.snapshot = [layer.get_base_layer().weight.detach().clone() for layer in self.layers]
            self.bypassed = [slot for slot in self.slots if not _has_hooks(slot[2])]
            for parent, attr, layer in self.bypassed:
                setattr(parent, attr, layer.get_base_layer())
        self.state: tuple[int, float] | None = None

    @torch.no_grad()
    def activate(self, stage: int, scale: float = 1.0) -> None:
        """Make ``stage``'s adapter the active one with LoRA scale ``scale`` (a no-op when nothing changes)."""
        if (stage, scale) == self.state:
            return
        if self.activation_changed:
            weights = [scale if k == stage else 0.0 for k in range(self.adapters.stages.num_stages)]
            self.adapters.set_stage(stage) if scale == 1.0 else self.adapters.set_weights(weights)
        if self.lora_mode == "fuse":
            name = self.adapters.stages.adapter_name(stage)
            for layer, saved in zip(self.layers, self.snapshot):
                weight = layer.get_base_layer().weight
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                delta = lora_delta(a, b, scale * self.scaling, saved.shape).to(weight.device)
                weight.copy_((saved.to(weight.device, torch.float64) + delta).to(weight.dtype))
                layer.merged_adapters[:] = [name]
        self.state = (stage, scale)

    @torch.no_grad()
    def close(self) -> None:
        """Copy the base weights back, put the LoRA wrappers back and re-activate the adapters active before."""
        moved = {layer: (saved.device, saved.dtype) for layer, saved in zip(self.layers, self.snapshot)}
        for parent, attr, layer in self.bypassed:
            setattr(parent, attr, layer)
            weight = layer.get_base_layer().weight
            if (weight.device, weight.dtype) != moved[layer]:  # the UNet moved while the wrapper was out of it
                for module in (layer.lora_A, layer.lora_B):
                    module.to(device=weight.device, dtype=weight.dtype)
        for layer, saved in zip(self.layers, self.snapshot):
            layer.get_base_layer().weight.copy_(saved)
            layer.merged_adapters.clear()
        self.bypassed = []
        if self.activation_changed:
            self.adapters.restore(self.active_before)
        self.state = None

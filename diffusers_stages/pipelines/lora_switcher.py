"""Per-stage LoRA adapters switched at stage boundaries, with the base weights restored bit-exactly afterwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from ..deme.adapters import StageLoraAdapters, lora_scaling

LORA_MODES = ("fuse", "unfused")
Wrapper = Union[LoraLayer, ModulesToSaveWrapper]  # a LoRA layer, or a per-stage norm copy


def _parent_slots(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Wrapper]]:
    """Every LoRA layer and per-stage norm copy of ``unet`` with the module holding it and its attribute name there."""
    slots, parents = [], [unet]
    while parents:  # one flat walk (``named_modules`` costs depth x modules); wrappers are not entered
        parent = parents.pop()
        for attr, child in parent.named_children():
            if isinstance(child, (LoraLayer, ModulesToSaveWrapper)):
                slots.append((parent, attr, child))
            else:
                parents.append(child)
    return slots


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _plain_module(wrapper: Wrapper) -> torch.nn.Module:
    """The module of the plain UNet inside a wrapper: the LoRA layer's base layer, or the base norm."""
    return wrapper.original_module if isinstance(wrapper, ModulesToSaveWrapper) else wrapper.get_base_layer()


def _adapter_modules(wrapper: Wrapper) -> tuple[torch.nn.Module, ...]:
    """The per-stage modules of a wrapper: the norm copies, or the LoRA matrices."""
    return (
        (wrapper.modules_to_save,) if isinstance(wrapper, ModulesToSaveWrapper) else (wrapper.lora_A, wrapper.lora_B)
    )


Fused = Callable[[torch.Tensor, str, float, torch.Tensor | None], torch.Tensor]


@dataclass
class FusedTensor:
    """A parameter of the plain UNet whose data fuse mode replaces by ``fused(base, stage name, scale)``."""

    target: torch.nn.Parameter
    base: torch.Tensor  # its data when the switcher was created: held, not copied, and put back by `restore`
    fused: Fused  # the fused value from the base value in working dtype, written into `out` when given
    work: torch.Tensor | None = None  # the data fuse mode gave `target`, rewritten in place at later boundaries

    def write(self, name: str, scale: float) -> None:
        """``target <- fused(base, name, scale)``, computed on the target's device in its dtype (at least float32)."""
        dtype = self.target.dtype
        base = self.base.to(self.target.device, torch.promote_types(dtype, torch.float32))
        if self.work is None or self.work.data_ptr() != self.target.data_ptr() or self.work.dtype != dtype:
            self.work = self.fused(base, name, scale, None).to(dtype)  # first boundary, or the UNet moved / was cast
            self.target.data = self.work
        elif dtype == base.dtype:
            self.fused(base, name, scale, self.work)
        else:
            self.work.copy_(self.fused(base, name, scale, None))

    def restore(self) -> None:
        """Put the base data back: the very tensor taken at creation, unless the UNet moved or was cast meanwhile."""
        self.target.data = self.base.to(self.target.device, self.target.dtype)
        self.work = None


def fused_tensors(wrapper: Wrapper, scaling: float) -> list[FusedTensor]:
    r"""
    What fuse mode writes for one wrapper: the weight ``W + s (alpha / r) B_k A_k`` of a LoRA layer (one ``addmm``)
    and, with LoRA biases, its bias ``b + s (alpha / r) b_k``; the parameters ``n + s (n_k - n)`` of a norm with
    per-stage copies (one ``lerp``). Computed from the base value the switcher holds, in the parameter's current dtype
    (at least float32) and device, so a UNet moved mid-call keeps working.
    """
    plain = _plain_module(wrapper)
    if isinstance(wrapper, ModulesToSaveWrapper):
        return [_norm_parameter(wrapper, attr, p) for attr, p in plain.named_parameters(recurse=False)]

    def fused_weight(base: torch.Tensor, name: str, s: float, out: torch.Tensor | None) -> torch.Tensor:
        a, b = wrapper.lora_A[name].weight.to(base), wrapper.lora_B[name].weight.to(base)
        flat = None if out is None else out.flatten(1)
        return torch.addmm(base.flatten(1), b.flatten(1), a.flatten(1), alpha=s * scaling, out=flat).view_as(base)

    def fused_bias(base: torch.Tensor, name: str, s: float, out: torch.Tensor | None) -> torch.Tensor:
        return torch.add(base, wrapper.lora_B[name].bias.to(base), alpha=s * scaling, out=out)

    fused = [FusedTensor(plain.weight, plain.weight.data, fused_weight)]
    if any(b.bias is not None for b in wrapper.lora_B.values()):
        fused.append(FusedTensor(plain.bias, plain.bias.data, fused_bias))
    return fused


def _norm_parameter(wrapper: ModulesToSaveWrapper, attr: str, param: torch.nn.Parameter) -> FusedTensor:
    """The fused value ``n + s (n_k - n)`` of the base norm's parameter ``attr`` (``"weight"`` or ``"bias"``)."""

    def fused(base: torch.Tensor, name: str, s: float, out: torch.Tensor | None) -> torch.Tensor:
        return torch.lerp(base, getattr(wrapper.modules_to_save[name], attr).to(base), s, out=out)

    return FusedTensor(param, param.data, fused)


class StageLoraSwitcher:
    r"""
    Activates the adapter of one stage at a time during a pipeline call, and puts everything back on `close`.

    ``"fuse"``: at a stage boundary every adapted weight becomes ``W + s (alpha / r) B_k A_k`` (``s`` the LoRA scale of
    the call, 1 by default), and with per-stage norms and biases every adapted bias ``b + s (alpha / r) b_k`` and
    every norm parameter ``n + s (n_k - n)``, computed from the base value held (not copied) when the switcher is
    created, in the parameter's current dtype (at least float32) and device (so a UNet moved mid-call, e.g. by model
    CPU offload, keeps working). For the whole call every PEFT wrapper (LoRA layer, per-stage norm copy) is replaced in its
    parent module by its plain module, so a step runs exactly the modules of the plain UNet (no per-layer adapter
    dispatch). `close` puts the base tensors themselves and the wrappers back: the base weights are bit-exactly what
    they were. LoRA wrappers carrying hooks (DeMe channel projections on a targeted convolution) stay in place and are
    marked merged instead.

    ``"unfused"``: the stage's adapter is activated (weight ``s``) and runs as a side branch every step; its norm
    copies replace the norms.

    Args:
        adapters (`StageLoraAdapters`): The per-stage adapters attached to the pipeline's UNet.
        lora_mode (`"fuse"` or `"unfused"`): Merge the active adapter into the weights, or keep it as a side branch.
    """

    def __init__(self, adapters: StageLoraAdapters, lora_mode: Literal["fuse", "unfused"]):
        if lora_mode not in LORA_MODES:
            raise ValueError(f"`lora_mode` must be one of {list(LORA_MODES)}, got {lora_mode!r}.")
        self.adapters, self.lora_mode = adapters, lora_mode
        self.slots = _parent_slots(adapters.unet)
        self.layers = [layer for _, _, layer in self.slots if isinstance(layer, LoraLayer)]
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
        self.fused: list[FusedTensor] = []
        self.bypassed: list[tuple[torch.nn.Module, str, Wrapper]] = []
        self.placement: dict[Wrapper, tuple[torch.device, torch.dtype]] = {}
        if lora_mode == "fuse":
            hooked = [attr for _, attr, m in self.slots if isinstance(m, ModulesToSaveWrapper) and _has_hooks(m)]
            if hooked:
                raise ValueError(
                    f"`lora_mode='fuse'` replaces per-stage norm copies, but a `{hooked[0]}` carries hooks; use "
                    "'unfused'."
                )
            self.fused = [t for _, _, layer in self.slots for t in fused_tensors(layer, self.scaling)]
            self.bypassed = [slot for slot in self.slots if not _has_hooks(slot[2])]
            for parent, attr, layer in self.bypassed:
                weight = next(_plain_module(layer).parameters())
                self.placement[layer] = (weight.device, weight.dtype)
                setattr(parent, attr, _plain_module(layer))
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
            for fused in self.fused:
                fused.write(name, scale)
            for layer in self.layers:
                layer.merged_adapters[:] = [name]
        self.state = (stage, scale)

    @torch.no_grad()
    def close(self) -> None:
        """Put the base tensors back, put the wrappers back and re-activate the adapters active before."""
        for parent, attr, layer in self.bypassed:
            setattr(parent, attr, layer)
            weight = next(_plain_module(layer).parameters())
            if (weight.device, weight.dtype) != self.placement[layer]:  # the UNet moved while the wrapper was out
                for module in _adapter_modules(layer):
                    module.to(device=weight.device, dtype=weight.dtype)
        for fused in self.fused:
            fused.restore()
        for layer in self.layers:
            layer.merged_adapters.clear()
        self.bypassed = []
        if self.activation_changed:
            self.adapters.restore(self.active_before)
        self.state = None

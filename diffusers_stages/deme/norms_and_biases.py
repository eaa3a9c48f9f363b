"""Per-stage norms and biases in DeMe's LoRA mode (ours): what each stage trains beside its LoRA matrices.

With ``train_norms_and_biases`` every stage adapter also holds
- its own copy of every ``GroupNorm`` / ``LayerNorm`` with affine parameters (PEFT's ``modules_to_save``: a
  ``ModulesToSaveWrapper`` per norm, switched with the adapter), stored as the copy's values ``n_k``;
- a bias update ``(alpha / r) b_k`` on every adapted layer that has a bias (PEFT's per-adapter ``lora_bias``: the bias
  of ``lora_B``, so the update is ``(alpha / r) (B_k A_k x + b_k)``). Adapted layers without a bias (e.g. ``to_q``)
  get none: the plain UNet has no bias there to merge it into.

Both are parameters of the plain UNet, so the merge stays exact: ``theta + sum_k w_k tau_k`` with
``tau_k = n_k - n`` for the norms and ``tau_k = (alpha / r) b_k`` for the biases, the same ``w_k`` as the LoRA updates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer

NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)
LORA_BIAS_SUFFIX = ".lora_B.bias"
MIN_PEFT = (0, 20)  # 0.18.0 gave wrong outputs with several adapters, 0.19.1 wrong state-dict keys (both tested)


def peft_supports_norms_and_biases() -> bool:
    """Whether the installed PEFT is at least `MIN_PEFT` (per-stage ``lora_bias`` / ``modules_to_save`` with several
    adapters are wrong in older ones)."""
    from importlib.metadata import version

    return tuple(int(part) for part in version("peft").split(".")[:2]) >= MIN_PEFT


def check_peft_supports_norms_and_biases() -> None:
    """A `ValueError` naming the needed PEFT when `peft_supports_norms_and_biases` is false."""
    from importlib.metadata import version

    if not peft_supports_norms_and_biases():
        needed = ".".join(map(str, MIN_PEFT))
        installed = version("peft")
        raise ValueError(
            f"`train_norms_and_biases` needs peft>={needed} (installed: {installed}); "
            f"upgrade with `pip install -U 'peft>={needed}'`."
        )


def norm_module_names(unet: torch.nn.Module) -> list[str]:
    """The full names of every ``GroupNorm`` / ``LayerNorm`` of ``unet`` that has affine parameters (sorted)."""
    return sorted(
        name
        for name, module in unet.named_modules()
        if isinstance(module, NORM_TYPES) and any(True for _ in module.parameters(recurse=False))
    )


def drop_unmergeable_lora_biases(unet: torch.nn.Module, adapter_name: str) -> None:
    """
    Remove the LoRA bias of ``adapter_name`` from every adapted layer whose base layer has no bias (PEFT's
    ``lora_bias`` adds one everywhere): a plain UNet has no parameter to merge it into.
    """
    for layer in unet.modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_B and layer.get_base_layer().bias is None:
            layer.lora_B[adapter_name].bias = None
            layer.lora_bias[adapter_name] = False


def norm_and_bias_task_vector(
    state_dict: Mapping[str, torch.Tensor], scaling: float, base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    r"""
    A stage's task vector on its norms and biases, under the plain parameter names, in float64 on the CPU:
    ``n_k - n`` for every parameter of its norm copies and ``scaling * b_k`` (``scaling = alpha / r``) for the LoRA
    bias ``b_k`` of every adapted layer. Empty for an adapter without them.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): The stage's adapter-free PEFT state dict (as saved).
        scaling (`float`): The LoRA scale ``alpha / r``.
        base (`Mapping[str, torch.Tensor]`): The plain base UNet's parameters ``n`` by name.
    """
    tau = {}
    for key, value in state_dict.items():
        if key.endswith(LORA_BIAS_SUFFIX):
            tau[key[: -len(LORA_BIAS_SUFFIX)] + ".bias"] = scaling * value.detach().double().cpu()
        elif "lora_" not in key:
            if key not in base:
                raise ValueError(f"The adapter holds a norm copy of `{key}`, which this `unet` does not have.")
            tau[key] = value.detach().double().cpu() - base[key].detach().double().cpu()
    unknown = sorted(name for name in tau if name not in base)[:3]
    if unknown:
        raise ValueError(f"The adapter holds LoRA biases of layers without a bias in this `unet`: {unknown}.")
    return tau

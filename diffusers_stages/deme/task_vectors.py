"""Task vectors of full-parameter DeMe finetuning: ``tau_k = theta_k - theta``, stored compactly, merged exactly.

A stage finetuned with ``finetune="full"`` is stored as ``stage{k}/task_vector.safetensors`` (every floating point
tensor of the UNet's state dict, ``theta_k - theta``, in ``task_vector_dtype``: bfloat16 by default, half the size of
an fp32 UNet, so the four task vectors of a Stable Diffusion UNet take 4 x 1.7 GB on disk or CPU and never need to
sit on the GPU together) plus ``stage{k}/stage_adapter.json`` (the same record as a LoRA stage, with
``"finetune": "full"``). The merge ``theta + sum_k w_k tau_k`` is computed in float64 from the stored values and cast
to the UNet's dtype: exact for the stored precision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from safetensors.torch import load_file, save_file

from ..stages import TimestepStages
from ..utils import atomic_directory
from .adapters import STAGE_ADAPTER_CONFIG_NAME, StageAdapterFiles, base_state_dict, lora_delta, lora_scaling
from .norms_and_biases import norm_and_bias_task_vector

TASK_VECTOR_WEIGHT_NAME = "task_vector.safetensors"
TaskVector = dict[str, torch.Tensor]


def compute_task_vector(
    finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> TaskVector:
    r"""
    The task vector ``tau = theta_k - theta`` of every floating point tensor (integer buffers are skipped, as in the
    authors' ``TaskVector``), on the CPU in ``dtype``. The difference is taken in float32 before the cast.

    Args:
        finetuned (`Mapping[str, torch.Tensor]`): The finetuned state dict ``theta_k`` (e.g. its EMA weights).
        base (`Mapping[str, torch.Tensor]`): The pretrained state dict ``theta`` (same keys).
        dtype (`torch.dtype`, defaults to `torch.bfloat16`): Storage dtype of the task vector.
    """
    missing = sorted(set(base) - set(finetuned))[:3]
    if missing:
        raise ValueError(f"`finetuned` lacks tensors of `base`: {missing}.")
    return {
        k: (finetuned[k].detach().float().cpu() - v.detach().float().cpu()).to(dtype)
        for k, v in base.items()
        if v.is_floating_point()
    }


def save_stage_task_vector(
    save_directory: Union[str, os.PathLike], stages: TimestepStages, stage: int, tau: TaskVector, info: dict
) -> None:
    """Write ``stages.json`` and ``stage{k}/`` (the task vector and ``info`` with ``"finetune": "full"``) atomically."""
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    stages.save_pretrained(save_directory)
    with atomic_directory(os.path.join(save_directory, stages.adapter_name(stage))) as tmp:
        save_file({k: v.contiguous() for k, v in tau.items()}, os.path.join(tmp, TASK_VECTOR_WEIGHT_NAME))
        with open(os.path.join(tmp, STAGE_ADAPTER_CONFIG_NAME), "w") as f:
            json.dump({**info, "finetune": "full"}, f, indent=2)


def is_full_finetune_dir(adapters_dir: Union[str, os.PathLike]) -> bool:
    """Whether ``adapters_dir`` holds full-finetuning task vectors (else LoRA adapters)."""
    return os.path.isfile(os.path.join(os.fspath(adapters_dir), "stage0", TASK_VECTOR_WEIGHT_NAME))


def read_stage_task_vectors(adapters_dir: Union[str, os.PathLike]) -> tuple[TimestepStages, list[TaskVector], dict]:
    """
    Read ``stages.json`` and every stage's task vector; check that none is missing and that all were trained on the
    same base (fingerprint). Returns the stages, the task vectors (stage 0 first) and stage 0's record.
    """
    root = os.fspath(adapters_dir)
    stages = TimestepStages.from_pretrained(root)
    taus, infos = [], []
    for k in range(stages.num_stages):
        folder = os.path.join(root, stages.adapter_name(k))
        if not os.path.isfile(os.path.join(folder, TASK_VECTOR_WEIGHT_NAME)):
            raise ValueError(f"`adapters_dir` {root} is missing the task vector of stage {k} ({folder}).")
        with open(os.path.join(folder, STAGE_ADAPTER_CONFIG_NAME)) as f:
            infos.append(json.load(f))
        taus.append(load_file(os.path.join(folder, TASK_VECTOR_WEIGHT_NAME)))
    prints = {i.get("base_fingerprint") for i in infos}
    if len(prints) != 1:
        raise ValueError(f"The stage task vectors were trained on different base models (fingerprints {prints}).")
    return stages, taus, infos[0]


def lora_task_vectors(unet: torch.nn.Module, files: Sequence[StageAdapterFiles]) -> list[TaskVector]:
    r"""
    The dense task vector of each LoRA stage: ``(alpha / r) B_k A_k`` under the adapted weight's name, plus its norms
    and biases if it has them (`norm_and_bias_task_vector`), in float32, so that merging methods other than task
    arithmetic (TIES) treat LoRA and full finetuning alike.

    Args:
        unet (`torch.nn.Module`): The plain base UNet (for the weights' shapes).
        files (`Sequence[StageAdapterFiles]`): The adapters (see `read_stage_adapters`).
    """
    if any(f.channel_projection is not None for f in files):
        raise ValueError("Only `merge_method='task_arithmetic'` merges channel projections; got adapters with them.")
    params = dict(unet.named_parameters())
    taus = []
    for f in files:
        tau = {
            k: v.float() for k, v in norm_and_bias_task_vector(f.state_dict, lora_scaling(f.config), params).items()
        }
        for name in sorted({k.split(".lora_A.")[0] for k in f.state_dict if ".lora_A." in k}):
            shape = params[f"{name}.weight"].shape
            a, b = f.state_dict[f"{name}.lora_A.weight"], f.state_dict[f"{name}.lora_B.weight"]
            tau[f"{name}.weight"] = lora_delta(a, b, lora_scaling(f.config), shape).float()
        taus.append(tau)
    return taus


@torch.no_grad()
def apply_task_vector(unet: torch.nn.Module, delta: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    r"""
    Add a merged task vector to a plain UNet in place: ``theta <- theta + delta`` (float64 sum, cast to each tensor's
    dtype). Keys are the plain state-dict names (PEFT's ``.base_layer`` is ignored).

    Args:
        unet (`torch.nn.Module`): The plain base UNet.
        delta (`Mapping[str, torch.Tensor]`): The merged task vector (e.g. `task_arithmetic` or `ties_merge`).
    """
    state = base_state_dict(unet)
    unknown = sorted(set(delta) - set(state))[:3]
    if unknown:
        raise ValueError(f"The task vector has tensors this `unet` does not have: {unknown}.")
    for name, d in delta.items():
        target = state[name]
        target.copy_((target.double() + d.to(target.device, torch.float64)).to(target.dtype))
    return unet


def task_arithmetic(taus: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> TaskVector:
    r"""Task arithmetic: the merged task vector ``sum_k w_k tau_k`` (float64), over the union of the keys."""
    if len(weights) != len(taus):
        raise ValueError(f"`weights` must hold one weight per task vector ({len(taus)}), got {list(weights)}.")
    merged: TaskVector = {}
    for tau, w in zip(taus, weights):
        for name, t in tau.items():
            merged[name] = merged.get(name, 0) + float(w) * t.double()
    return merged

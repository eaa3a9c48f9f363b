"""Parameter and multiply-accumulate (MAC) counting for any `nn.Module`, and a per-stage report for multi-decoder UNets.

What `count_macs` counts, for ONE forward call (every call of a module inside it is counted):

- ``nn.Conv1d/2d/3d``: ``output.numel() * in_channels / groups * prod(kernel_size)``;
  ``nn.ConvTranspose*d``: ``input.numel() * out_channels / groups * prod(kernel_size)``.
- ``nn.Linear`` (PEFT LoRA ``lora_A`` / ``lora_B`` included, they are `nn.Linear`): ``output.numel() * in_features``.
- The attention matmuls of diffusers' `Attention` (``softmax(Q K^T) V``, whatever the processor):
  ``2 * batch * L_q * L_k * inner_dim`` (its projections are `nn.Linear` and counted as such).
- ``nn.MultiheadAttention``: its input / output projections and the two matmuls.

Not counted: normalisations, activations, softmax, additions and other element-wise operations, and embeddings
(lookups). Biases are not counted (a MAC is one multiply and one add).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters of ``module`` (shared parameters once); only those with ``requires_grad`` if asked."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _tokens(x: torch.Tensor) -> int:
    """Sequence length of an attention input: ``H * W`` for a feature map ``[B, C, H, W]``, else ``x.shape[1]``."""
    return x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]


def _conv_macs(module, inputs, output) -> int:
    kernel = math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inputs[0].numel() * (module.out_channels // module.groups) * kernel
    return output.numel() * (module.in_channels // module.groups) * kernel


def _attention_macs(module: Attention, args, kwargs) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    if isinstance(context, (tuple, list)):  # IP-Adapter: (text, image) contexts
        context = context[0]
    length_q = _tokens(hidden)
    length_k = _tokens(context) if context is not None else length_q
    return 2 * hidden.shape[0] * length_q * length_k * module.inner_dim


def _mha_macs(module: nn.MultiheadAttention, args, kwargs) -> int:
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    seq_dim = 1 if module.batch_first and query.ndim == 3 else 0
    batch = 1 if query.ndim == 2 else query.shape[1 - seq_dim]
    length_q, length_k, embed = query.shape[seq_dim], key.shape[seq_dim], module.embed_dim
    projections = length_q * embed * embed + length_k * (module.kdim + module.vdim) * embed + length_q * embed * embed
    return batch * (projections + 2 * length_q * length_k * embed)


@torch.no_grad()
def count_macs(model: nn.Module, *args, **kwargs) -> int:
    """
    Multiply-accumulates of ONE ``model(*args, **kwargs)`` call, measured with forward hooks (see the module
    docstring for what is counted). Works on any `nn.Module`; the model runs once, without gradients.
    """
    total = [0]
    handles = []

    def add(count: int) -> None:
        total[0] += int(count)

    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(lambda m, i, o: add(_conv_macs(m, i, o))))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, i, o: add(o.numel() * m.in_features)))
        elif isinstance(module, Attention):
            handles.append(
                module.register_forward_hook(lambda m, a, k, o: add(_attention_macs(m, a, k)), with_kwargs=True)
            )
        elif isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_hook(lambda m, a, k, o: add(_mha_macs(m, a, k)), with_kwargs=True))
    try:
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


@dataclass
class StageProfile:
    """Size and cost of a multi-decoder UNet at one stage (the encoder plus that stage's decoder)."""

    stage: int
    timestep: float
    encoder_parameters: int
    decoder_parameters: int
    parameters: int
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


def stage_report(model: nn.Module, sample: torch.Tensor, timesteps: list[float] | None = None, **forward_kwargs):
    r"""
    Parameters and MACs per stage of a multi-decoder UNet: for stage ``k``, the shared encoder plus decoder ``k``,
    and the MACs of one forward of ``sample`` (the whole batch at one timestep of stage ``k``).

    Args:
        model (`MultiDecoderUNet2DModel` or `MultiDecoderUNet2DConditionModel`): the model.
        sample (`torch.Tensor`): the input batch.
        timesteps (`list[float]`, *optional*):
            One timestep inside each stage; by default the midpoint of each stage of ``[0, num_train_timesteps)``.
        **forward_kwargs: the other forward arguments (``encoder_hidden_states=...`` for the conditional model).

    Returns:
        `list[StageProfile]`: one entry per stage.
    """
    if timesteps is None:
        edges = [0, *model.config.stage_boundaries, model.config.num_train_timesteps]
        timesteps = [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])]
    if len(timesteps) != model.num_stages:
        raise ValueError(f"`timesteps` must hold one timestep per stage ({model.num_stages}), got {len(timesteps)}.")
    decoder_params = [count_parameters(decoder) for decoder in model.decoders]
    encoder_params = count_parameters(model) - sum(decoder_params)
    report = []
    for k, t in enumerate(timesteps):
        stage = int(model.stage_index(torch.tensor(float(t))))
        if stage != k:
            raise ValueError(f"`timesteps[{k}]` = {t} lies in stage {stage}, not in stage {k}.")
        timestep = torch.full((sample.shape[0],), float(t), device=sample.device)
        macs = count_macs(model, sample, timestep, **forward_kwargs)
        report.append(
            StageProfile(k, float(t), encoder_params, decoder_params[k], encoder_params + decoder_params[k], macs)
        )
    return report

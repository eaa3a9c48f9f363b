"""`StageExpertsUNet`: one complete UNet per timestep stage (TDC's per-group experts, or any per-stage fine-tunes)."""

from __future__ import annotations

from typing import Union

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel  # `ModelMixin` here: DiffusionPipeline loading
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from ..stages import TimestepStages
from .multi_decoder import take
from .routing import StageRoutingMixin

EXPERT_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}
# What every expert must share: the interface a pipeline sees (``None`` where the class has no such field).
FAMILY_KEYS = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "time_cond_proj_dim")


def _take_all(x, index: torch.Tensor, batch_size: int):
    """`take` extended to dicts (``added_cond_kwargs``): the rows ``index`` of every batch-first tensor."""
    if isinstance(x, dict):
        return {k: _take_all(v, index, batch_size) for k, v in x.items()}
    return take(x, index, batch_size)


class StageExpertsUNet(StageRoutingMixin, ModelMixin, ConfigMixin):
    r"""
    ``K`` complete UNets, one per timestep stage: a sample with timestep ``t`` is denoised by expert
    :math:`k = \#\{b \in \text{stage\_boundaries} : b \le t\}` (stage 0 is the least noisy). The experts may have
    different configurations (e.g. per-stage pruned copies, TDC) but must belong to one family: the same class
    (`UNet2DModel` or `UNet2DConditionModel`) and the same ``in_channels``, ``out_channels``, ``sample_size``,
    ``cross_attention_dim`` and ``time_cond_proj_dim``. ``forward`` has the stock UNet signature and output, so the
    model is a drop-in for `DDPMPipeline`, `StableDiffusionPipeline` and the stage-aware pipelines.

    Args:
        stage_boundaries (`list[float]`, defaults to `[500]`):
            The ``K - 1`` strictly increasing interior boundaries, in the units of the ``timestep`` the model is called
            with (integer training timesteps for DDPM-style schedulers).
        num_train_timesteps (`int`, defaults to 1000): The length ``T`` of the training time grid.
        expert_class_names (`list[str]`): The class of each expert, ``"UNet2DModel"`` or ``"UNet2DConditionModel"``.
        expert_configs (`list[dict]`): The configuration of each expert (``expert.config``), in stage order.
        in_channels, out_channels, sample_size, cross_attention_dim, time_cond_proj_dim (*optional*):
            The family's interface, read by pipelines (``unet.config.sample_size``). Filled in from the experts;
            when given, they must match them.
    """

    @register_to_config
    def __init__(
        self,
        stage_boundaries: list[float] = (500,),
        num_train_timesteps: int = 1000,
        expert_class_names: list[str] = ("UNet2DModel", "UNet2DModel"),
        expert_configs: list[dict] = ({}, {}),
        in_channels: int | None = None,
        out_channels: int | None = None,
        sample_size: Union[int, list[int], None] = None,
        cross_attention_dim: Union[int, list[int], None] = None,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        boundaries = list(stage_boundaries)
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in boundaries) or any(
            b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])
        ):
            raise ValueError(f"`stage_boundaries` must be strictly increasing numbers, got {boundaries!r}.")
        names, configs = list(expert_class_names), list(expert_configs)
        if len(names) != len(configs):
            raise ValueError(
                f"`expert_class_names` ({len(names)}) and `expert_configs` ({len(configs)}) must have one entry per "
                "expert."
            )
        unknown = sorted({n for n in names if n not in EXPERT_CLASSES})
        if unknown:
            raise ValueError(f"`expert_class_names` must be in {sorted(EXPERT_CLASSES)}, got {unknown}.")
        self._check_count(len(names), len(boundaries) + 1)
        experts = [EXPERT_CLASSES[n].from_config(c) for n, c in zip(names, configs)]
        family = self._check_family(experts)
        given = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "sample_size": sample_size,
            "cross_attention_dim": cross_attention_dim,
            "time_cond_proj_dim": time_cond_proj_dim,
        }
        wrong = {k: v for k, v in given.items() if v is not None and _normalise(v) != family[k]}
        if wrong:
            raise ValueError(f"{sorted(wrong)} = {wrong} do not match the experts' {[family[k] for k in wrong]}.")
        self.register_to_config(**family)
        self.experts = nn.ModuleList(experts)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_count(num_experts: int, num_stages: int) -> None:
        if num_experts != num_stages:
            raise ValueError(
                f"`experts`: one expert per stage is needed ({num_stages} stages from the boundaries), got "
                f"{num_experts}."
            )

    @staticmethod
    def _check_family(experts: list[nn.Module]) -> dict:
        """The shared interface of ``experts``, or a `ValueError` naming the first expert that differs."""
        if not experts:
            raise ValueError("`experts` must hold at least one UNet.")
        for k, e in enumerate(experts):
            if type(e) not in EXPERT_CLASSES.values():
                raise ValueError(
                    f"`experts[{k}]` must be one of {sorted(EXPERT_CLASSES)}, got {type(e).__name__} (a multi-decoder "
                    "UNet routes by itself: use it directly)."
                )
        family = [{key: _normalise(e.config.get(key)) for key in FAMILY_KEYS} for e in experts]
        for k, e in enumerate(experts[1:], start=1):
            if type(e) is not type(experts[0]):
                raise ValueError(
                    f"`experts` must all be of one architecture family: experts[0] is a {type(experts[0]).__name__}, "
                    f"experts[{k}] a {type(e).__name__}."
                )
            diff = [
                f"{key} {family[k][key]} != {family[0][key]}"
                for key in FAMILY_KEYS
                if family[k][key] != family[0][key]
            ]
            if diff:
                raise ValueError(
                    f"`experts` must all be of one architecture family: experts[{k}] differs from experts[0] in "
                    f"{', '.join(diff)}."
                )
        return family[0]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_experts(cls, experts: list[nn.Module], stages: Union[TimestepStages, list[float]]) -> StageExpertsUNet:
        r"""
        Gather trained UNets into one model (their weights are copied; device, dtype and train / eval mode follow
        ``experts[0]``).

        Args:
            experts (`list[UNet2DModel]` or `list[UNet2DConditionModel]`): One UNet per stage, stage 0 first.
            stages (`TimestepStages` or `list[float]`):
                The stages, or the ``K - 1`` interior boundaries in the units of the experts' ``timestep`` argument.
        """
        experts = list(experts)
        cls._check_family(experts)
        if isinstance(stages, TimestepStages):
            boundaries, num_train_timesteps = list(stages.boundaries), stages.num_train_timesteps
        else:
            boundaries = list(stages)
            num_train_timesteps = experts[0].config.get("num_train_timesteps") or 1000
        cls._check_count(len(experts), len(boundaries) + 1)
        model = cls(
            stage_boundaries=boundaries,
            num_train_timesteps=num_train_timesteps,
            expert_class_names=[type(e).__name__ for e in experts],
            expert_configs=[{k: v for k, v in e.config.items() if not k.startswith("_")} for e in experts],
        )
        for target, source in zip(model.experts, experts):
            target.load_state_dict(source.state_dict())
        model.train(experts[0].training)
        model.to(experts[0].device)
        return model if model.dtype == experts[0].dtype else model.to(dtype=experts[0].dtype)

    # ------------------------------------------------------------------ stages
    # ------------------------------------------------------------------ forward
    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int], *args, **kwargs):
        r"""
        The stock UNet call, routed per sample: with one stage in the batch the expert runs on the whole batch;
        with several, each used expert runs once on its sub-batch and the outputs are reassembled in order.

        Args:
            sample (`torch.Tensor`): The noisy input ``(batch, channel, height, width)``.
            timestep (`torch.Tensor`, `float` or `int`): One timestep, or one per sample.
            *args, **kwargs: Passed to the expert (``encoder_hidden_states``, ``class_labels``, ``return_dict``, ...);
                batch-first tensors (also inside tuples, lists and dicts) are split with the batch.

        Returns:
            The experts' output (`UNet2DOutput` / `UNet2DConditionOutput`, or a tuple with ``return_dict=False``).
        """
        batch = sample.shape[0]
        t = torch.as_tensor(timestep)
        if t.ndim > 1 or t.numel() not in (1, batch):
            raise ValueError(
                f"`timestep` must be a scalar or a 1-D tensor with 1 or batch_size ({batch}) entries, "
                f"got shape {tuple(t.shape)}."
            )
        stages = self.stage_index(t.reshape(-1))
        used = stages.unique().tolist()
        if len(used) == 1:
            return self.experts[used[0]](sample, timestep, *args, **kwargs)
        outputs, order = [], []
        for k in used:
            index = (stages == k).nonzero().squeeze(1).to(sample.device)
            sub_args = _take_all((sample, timestep, *args), index, batch)
            out = self.experts[k](*sub_args, **_take_all(kwargs, index, batch))
            outputs.append(out[0])
            order.append(index)
        merged = torch.cat(outputs)[torch.argsort(torch.cat(order))]
        return (merged,) if isinstance(out, tuple) else type(out)(sample=merged)


def _normalise(value):
    """Config values compared as JSON would store them (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value

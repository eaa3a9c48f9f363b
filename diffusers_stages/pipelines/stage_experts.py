"""What the stage-aware pipelines share: per-stage LoRA adapters switched at stage boundaries, and the input checks.

Three kinds of experts, one rule (at every step the expert of the step's stage is used):

- a `MultiDecoderUNet2DModel` / `MultiDecoderUNet2DConditionModel` or a `StageExpertsUNet` as ``unet``: the model
  routes each sample by its timestep itself;
- per-stage LoRA adapters on a plain ``unet`` (`StageLoraAdapters`, loaded with `load_stage_adapters`): the pipeline
  activates the stage's adapter at each stage boundary. With ``lora_mode="fuse"`` the adapter is merged into the base
  weights for the whole stage (``W <- W + (alpha / r) B_k A_k``, so a step costs what a plain UNet step costs) and the
  base weights are restored bit-exactly from a snapshot at the next boundary and after the call;
  ``lora_mode="unfused"`` keeps the adapter as a side branch (``W x + (alpha / r) B_k A_k x`` every step).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Union

import torch

from ..deme.adapters import StageLoraAdapters, base_state_dict, lora_scaling
from ..deme.merging import lora_delta
from ..stages import TimestepStages

STAGE_ADAPTERS_SUBFOLDER = "stage_adapters"
LORA_MODES = ("fuse", "unfused")


class StageLoraSwitcher:
    r"""
    Activates the adapter of one stage at a time during a pipeline call, and puts everything back afterwards.

    ``"fuse"``: at a stage boundary every adapted weight becomes ``W + (alpha / r) B_k A_k`` (computed in float64 from
    a snapshot of ``W`` taken when the switcher is created, then cast) and the layer is marked merged, so PEFT's
    forward runs the base layer only; the snapshot is copied back at the next boundary and on `close`, so the base
    weights come back bit-exactly. The active adapters are only touched where they still act (DeMe channel
    projections). ``"unfused"``: the stage's adapter is activated and runs as a side branch every step.

    Args:
        adapters (`StageLoraAdapters`): The per-stage adapters attached to the pipeline's UNet.
        lora_mode (`"fuse"` or `"unfused"`): Merge the active adapter into the weights, or keep it as a side branch.
    """

    def __init__(self, adapters: StageLoraAdapters, lora_mode: Literal["fuse", "unfused"]):
        self.adapters, self.lora_mode = adapters, lora_mode
        self.layers = list(adapters.lora_layers)
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
        self.snapshot = (
            [layer.get_base_layer().weight.detach().clone() for layer in self.layers] if lora_mode == "fuse" else []
        )
        self.stage: int | None = None

    @torch.no_grad()
    def activate(self, stage: int) -> None:
        """Make ``stage``'s adapter the active one (a no-op inside the current stage)."""
        if stage == self.stage:
            return
        if self.activation_changed:
            self.adapters.set_stage(stage)
        if self.lora_mode == "fuse":
            name = self.adapters.stages.adapter_name(stage)
            for layer, weight in zip(self.layers, self.snapshot):
                delta = lora_delta(layer.lora_A[name].weight, layer.lora_B[name].weight, self.scaling, weight.shape)
                layer.get_base_layer().weight.copy_((weight.double() + delta).to(weight.dtype))
                layer.merged_adapters[:] = [name]
        self.stage = stage

    @torch.no_grad()
    def close(self) -> None:
        """Copy the base weights back from the snapshot and re-activate the adapters active before the call."""
        for layer, weight in zip(self.layers, self.snapshot):
            layer.get_base_layer().weight.copy_(weight)
            layer.merged_adapters.clear()
        if self.activation_changed:
            self.adapters.restore(self.active_before)
        self.stage = None


class StageExpertsMixin:
    """
    Pipeline mixin: per-stage LoRA adapters (attach, save with the pipeline, reload), the stage of each sampling step,
    and the checks made before sampling starts. The pipeline's ``__init__`` registers ``stage_adapters_subfolder``
    (the folder of the saved adapters, ``None`` when there are none).
    """

    _stage_adapters: StageLoraAdapters | None = None

    @property
    def stage_adapters(self) -> StageLoraAdapters | None:
        """The per-stage LoRA adapters on ``unet`` (``None`` when the UNet itself holds the experts)."""
        return self._stage_adapters

    def load_stage_adapters(self, adapters: Union[str, os.PathLike, StageLoraAdapters]) -> StageLoraAdapters:
        r"""
        Attach per-stage LoRA adapters to the pipeline's ``unet``.

        Args:
            adapters (`str`, `os.PathLike` or `StageLoraAdapters`):
                A folder written by `StageLoraAdapters.save_pretrained` / ``train_stage_lora.py`` (``stages.json`` and
                ``stage{k}/``; every stage must be there and the adapters must have been trained on this ``unet``),
                or adapters already attached to this pipeline's ``unet``.
        """
        if self._stage_adapters is not None:
            raise ValueError("This pipeline already has stage adapters.")
        if isinstance(adapters, StageLoraAdapters):
            if adapters.unet is not self.unet:
                raise ValueError("`adapters` are attached to another UNet than this pipeline's `unet`.")
        else:
            adapters = StageLoraAdapters.from_pretrained(self.unet, adapters)
        self._stage_adapters = adapters
        return adapters

    def _load_saved_stage_adapters(self) -> None:
        """Attach the adapters saved with the pipeline (local folder or Hub repo), once."""
        subfolder = self.config.get("stage_adapters_subfolder")
        if subfolder is None or self._stage_adapters is not None:
            return
        root = self.name_or_path
        if root is None:
            raise ValueError(
                "`stage_adapters_subfolder` is set but the pipeline was not loaded from a folder or repo."
            )
        if not os.path.isdir(root):
            from huggingface_hub import snapshot_download

            root = snapshot_download(root, allow_patterns=[f"{subfolder}/*"])
        self.load_stage_adapters(Path(root) / subfolder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained`, then the stage adapters saved with the pipeline are attached."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe._load_saved_stage_adapters()
        return pipe

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """
        `DiffusionPipeline.save_pretrained` (safetensors); with stage adapters, the ``unet`` is saved without its LoRA
        layers and the adapters go to ``stage_adapters/`` (the `StageLoraAdapters` format), reloaded by
        `from_pretrained`.
        """
        adapters = self._stage_adapters
        if adapters is None:
            return super().save_pretrained(save_directory, **kwargs)
        adapters.save_pretrained(
            Path(save_directory) / STAGE_ADAPTERS_SUBFOLDER
        )  # first: model_index.json refers to it
        base = type(self.unet).from_config(self.unet.config)
        base.load_state_dict(base_state_dict(self.unet))
        unet = self.unet
        self.register_to_config(stage_adapters_subfolder=STAGE_ADAPTERS_SUBFOLDER)
        try:
            self.register_modules(unet=base)
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_modules(unet=unet)

    # ------------------------------------------------------------------ Hub
    def _experts_description(self) -> str:
        if self._stage_adapters is not None:
            return "per-stage LoRA adapters"
        if "decoders" in dict(self.unet.named_children()):
            return "a multi-decoder UNet"
        if "experts" in dict(self.unet.named_children()):
            return "per-stage UNets"
        return "a single UNet"

    def model_card(self, base_model: str | None = None, repo_id: str | None = None, **fields):
        r"""
        The pipeline's model card (``model_cards/stage_aware_pipeline.md``): the expert kind, the stage table and how
        to load it.

        Args:
            base_model (`str`, *optional*): The model the experts were trained from.
            repo_id (`str`, *optional*): The Hub repo, for the loading snippet.
            **fields: More template variables (``model_name``, ...).
        """
        from ..hub import render_model_card

        routing = self._routing_stages()
        edges = [] if routing is None else [0, *routing[0], routing[1]]
        stages = [{"stage": k, "start": a, "end": b} for k, (a, b) in enumerate(zip(edges, edges[1:]))]
        return render_model_card(
            "stage_aware_pipeline.md",
            base_model=base_model,
            tags=[
                "stage-aware",
                "text-to-image" if hasattr(self, "text_encoder") else "unconditional-image-generation",
            ],
            pipeline_tag="text-to-image" if hasattr(self, "text_encoder") else "unconditional-image-generation",
            pipeline_class=type(self).__name__,
            experts=self._experts_description(),
            stages=stages,
            repo_id=repo_id,
            **fields,
        )

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        base_model: str | None = None,
        endpoint: str | None = None,
        **card_fields,
    ) -> str:
        r"""
        Save the pipeline with its experts into a temporary folder, add the model card (`model_card`) and a
        ``pipeline.py`` naming this class (so ``custom_pipeline=repo_id`` works), check the folder and upload it in one
        commit (`diffusers_stages.hub.push_to_hub`). Returns the commit URL.

        Args:
            repo_id (`str`): ``"user/name"`` on the Hub.
            token (`str`, *optional*): A write token.
            private (`bool`, defaults to `False`): Create the repo private.
            base_model (`str`, *optional*): Recorded in the model card.
            endpoint (`str`, *optional*): Another Hub endpoint.
            **card_fields: More model-card variables.
        """
        from ..hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            self.model_card(base_model=base_model, repo_id=repo_id, **card_fields).save(Path(tmp) / "README.md")
            cls = type(self)
            (Path(tmp) / "pipeline.py").write_text(
                f'"""Custom pipeline (needs `pip install diffusers-stages`)."""\n\n'
                f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n"
            )
            return push_to_hub(
                tmp, repo_id, token=token, private=private, endpoint=endpoint, commit_message=f"Upload {cls.__name__}"
            )

    # ------------------------------------------------------------------ sampling
    def _routing_stages(self) -> tuple[list[float], int] | None:
        """The boundaries (timestep units) and ``T`` the experts are chosen by, ``None`` for a plain UNet."""
        if self._stage_adapters is not None:
            stages = self._stage_adapters.stages
            return list(stages.boundaries), stages.num_train_timesteps
        config = self.unet.config
        if "stage_boundaries" in config:
            return list(config.stage_boundaries), config.num_train_timesteps
        return None

    def check_stage_timesteps(self, timesteps: torch.Tensor) -> None:
        """
        Fail before sampling when the stage boundaries cannot match the scheduler's timesteps: stages over the integer
        grid ``[0, T)`` need a scheduler with the same ``num_train_timesteps`` whose timesteps lie in ``[0, T)``
        (a sigma-space scheduler must then condition on the timestep index, e.g. ``noise_conditioning="index"``).
        """
        routing = self._routing_stages()
        if routing is None:
            return
        boundaries, num_train_timesteps = routing
        if not all(float(b).is_integer() for b in boundaries):
            return  # boundaries in the scheduler's own (e.g. sigma) units
        scheduler_t = self.scheduler.config.get("num_train_timesteps")
        t = timesteps.double()
        if scheduler_t not in (None, num_train_timesteps) or t.min() < 0 or t.max() >= num_train_timesteps:
            raise ValueError(
                f"The stage boundaries {boundaries} are integer timesteps in [0, {num_train_timesteps}), but the "
                f"scheduler {type(self.scheduler).__name__} (num_train_timesteps={scheduler_t}) gives timesteps in "
                f"[{float(t.min()):.4g}, {float(t.max()):.4g}]: use a scheduler over the same training grid (for a "
                "sigma-space one, index conditioning) or experts whose boundaries are in the scheduler's units."
            )

    @contextmanager
    def stage_experts(self, lora_mode: Literal["fuse", "unfused"] = "fuse") -> Iterator:
        r"""
        Yield ``select(t)``, to call before every UNet evaluation at timestep ``t``: it activates the stage's adapter
        at stage boundaries (a no-op for a UNet that routes itself). On exit, also after an exception or an
        interruption, the UNet's weights and active adapters are exactly what they were before.

        Args:
            lora_mode (`"fuse"` or `"unfused"`, defaults to `"fuse"`): How the active stage adapter is applied.
        """
        if lora_mode not in LORA_MODES:
            raise ValueError(f"`lora_mode` must be one of {list(LORA_MODES)}, got {lora_mode!r}.")
        adapters = self._stage_adapters
        if adapters is None:
            yield lambda t: None
            return
        switcher = StageLoraSwitcher(adapters, lora_mode)
        stages: TimestepStages = adapters.stages
        try:
            yield lambda t: switcher.activate(int(stages.stage_index(torch.as_tensor(t).reshape(-1)[:1].cpu())))
        finally:
            switcher.close()

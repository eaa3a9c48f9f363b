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

import copy
import inspect
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal, Union

import torch

from ..deme.adapters import StageLoraAdapters, base_state_dict
from .lora_switcher import LORA_MODES, StageLoraSwitcher
from .stage_switching import switch_stage_experts

STAGE_ADAPTERS_SUBFOLDER = "stage_adapters"
CUSTOM_PIPELINE_FILE = "pipeline"  # `pipeline.py` next to `model_index.json`: `_class_name: ["pipeline", <class>]`


def custom_code_lock():
    """
    A lock shared by all processes of this machine around loading a folder's ``pipeline.py``: diffusers rewrites it
    into one shared module file (``HF_MODULES_CACHE/diffusers_modules/local/pipeline.py``) on every load and imports
    it from there, so processes loading at once (``torchrun``) could import another's half-written copy.
    """
    from diffusers.utils.constants import HF_MODULES_CACHE
    from filelock import FileLock

    os.makedirs(HF_MODULES_CACHE, exist_ok=True)
    return FileLock(os.path.join(HF_MODULES_CACHE, "diffusers_stages.lock"))


def custom_pipeline_source(cls: type) -> str:
    """The ``pipeline.py`` saved with a pipeline of class ``cls``: it only imports the class from this package."""
    return (
        f'"""Custom pipeline (needs `pip install diffusers-stages`): '
        f'`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`."""\n\n'
        f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n"
    )


def write_custom_pipeline_entry(save_directory: Union[str, os.PathLike], cls: type) -> None:
    """
    Make a saved pipeline folder load with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``:
    ``_class_name`` becomes ``["pipeline", cls.__name__]`` and ``pipeline.py`` (`custom_pipeline_source`) is written.
    """
    index = Path(save_directory) / "model_index.json"
    config = json.loads(index.read_text())
    config["_class_name"] = [CUSTOM_PIPELINE_FILE, cls.__name__]
    (Path(save_directory) / f"{CUSTOM_PIPELINE_FILE}.py").write_text(custom_pipeline_source(cls))
    index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
        """
        Attach the adapters saved with the pipeline, once: from ``stage_adapters_subfolder`` of the config (local
        folder or Hub repo), or, for a class without that config entry, from a local ``stage_adapters/`` folder.
        """
        if self._stage_adapters is not None:
            return
        registered = "stage_adapters_subfolder" in self.config
        subfolder = self.config.get("stage_adapters_subfolder") if registered else STAGE_ADAPTERS_SUBFOLDER
        root = self.name_or_path
        if subfolder is None or (not registered and (root is None or not os.path.isdir(root))):
            return
        if root is None:
            raise ValueError(
                "`stage_adapters_subfolder` is set but the pipeline was not loaded from a folder or repo."
            )
        if not os.path.isdir(root):
            from huggingface_hub import snapshot_download

            root = snapshot_download(root, allow_patterns=[f"{subfolder}/*"])
        if registered or (Path(root) / subfolder / "stages.json").is_file():
            self.load_stage_adapters(Path(root) / subfolder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """
        `DiffusionPipeline.from_pretrained`, then the stage adapters saved with the pipeline are attached. A folder
        saved by this class names its own ``pipeline.py`` in ``_class_name`` (for ``DiffusionPipeline`` users); when
        that file is exactly the one this package writes, it is trusted without ``trust_remote_code``.
        """
        from .saving import import_component_modules

        import_component_modules()
        own_code = cls._is_own_custom_pipeline(pretrained_model_name_or_path, kwargs)
        if own_code:
            kwargs["trust_remote_code"] = True
        with custom_code_lock() if own_code else nullcontext():
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe._load_saved_stage_adapters()
        return pipe

    @classmethod
    def _is_own_custom_pipeline(cls, pretrained_model_name_or_path, kwargs: dict) -> bool:
        """Whether the folder names ``["pipeline", cls.__name__]`` with the ``pipeline.py`` we write for ``cls``."""
        root = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(root) or kwargs.get("custom_pipeline") is not None:
            return False
        config = cls.load_config(root)
        source = Path(root) / f"{CUSTOM_PIPELINE_FILE}.py"
        return (
            config.get("_class_name") == [CUSTOM_PIPELINE_FILE, cls.__name__]
            and source.is_file()
            and source.read_text() == custom_pipeline_source(cls)
        )

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
        if "stage_adapters_subfolder" in inspect.signature(type(self).__init__).parameters:
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
            (Path(tmp) / f"{CUSTOM_PIPELINE_FILE}.py").write_text(custom_pipeline_source(cls))
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
    def stage_experts(self, lora_mode: Literal["fuse", "unfused"] = "fuse") -> Iterator[StageLoraSwitcher | None]:
        r"""
        While inside, every ``unet`` call uses the expert of its timestep's stage (`switch_stage_experts`: a forward
        pre-hook fuses / activates the stage's LoRA adapter at stage boundaries; nothing to do for a UNet that routes
        itself). On exit, also after an exception or an interruption, the UNet's weights and active adapters are
        exactly what they were before.

        Args:
            lora_mode (`"fuse"` or `"unfused"`, defaults to `"fuse"`): How the active stage adapter is applied.
        """
        if lora_mode not in LORA_MODES:
            raise ValueError(f"`lora_mode` must be one of {list(LORA_MODES)}, got {lora_mode!r}.")
        if self._stage_adapters is None:
            yield None
            return
        with switch_stage_experts(self.unet, self._stage_adapters, lora_mode) as switcher:
            yield switcher

    def __call__(self, *args, lora_mode: Literal["fuse", "unfused"] = "fuse", **kwargs):
        r"""
        The stock pipeline's own ``__call__`` (every one of its arguments works as documented there) inside
        `stage_experts`, after checking the inputs and the stage boundaries against the scheduler's timesteps.

        Args:
            *args, **kwargs: The arguments of the stock pipeline's ``__call__``.
            lora_mode (`"fuse"` or `"unfused"`, defaults to `"fuse"`): With stage adapters, merge the stage's adapter
                into the weights at each stage boundary, or apply it as a side branch at every step.
        """
        call = super().__call__
        bound = inspect.signature(call).bind(*args, **kwargs)
        bound.apply_defaults()
        self.check_call_arguments(bound.arguments)
        self._load_saved_stage_adapters()
        self._check_stage_schedule(bound.arguments)
        with self.stage_experts(lora_mode):
            return call(*args, **kwargs)

    def check_call_arguments(self, arguments: dict) -> None:
        """Clear `ValueError`s for call arguments the stock pipelines accept but turn into odd failures."""
        steps = arguments.get("num_inference_steps")
        custom = arguments.get("timesteps") is not None or arguments.get("sigmas") is not None
        if steps is not None and not custom and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"`num_inference_steps` must be a positive int, got {steps!r}.")
        batch_size = arguments.get("batch_size")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        for name in ("prompt", "prompt_2", "negative_prompt"):
            if isinstance(arguments.get(name), (list, tuple)) and not arguments[name]:
                raise ValueError(f"`{name}` must be a string or a non-empty list of strings, got an empty list.")

    def _check_stage_schedule(self, arguments: dict) -> None:
        """`check_stage_timesteps` on the full schedule of a copy of the scheduler (the pipeline's is not touched)."""
        if self._routing_stages() is None:
            return
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        scheduler = copy.deepcopy(self.scheduler)
        timesteps, _ = retrieve_timesteps(
            scheduler,
            arguments.get("num_inference_steps"),
            "cpu",
            arguments.get("timesteps"),
            arguments.get("sigmas"),
        )
        self.check_stage_timesteps(timesteps)

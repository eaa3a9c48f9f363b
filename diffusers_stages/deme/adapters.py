"""Per-stage LoRA adapters: one PEFT LoRA adapter per timestep stage on a UNet (Decouple-then-Merge).

Adapter ``k`` is named ``TimestepStages.adapter_name(k) = "stage{k}"``. On disk every stage is a folder holding the
file that diffusers' own ``StableDiffusionPipeline.save_lora_weights`` writes (``pytorch_lora_weights.safetensors``,
keys ``unet.<module>.lora_A.weight`` and the adapter's ``LoraConfig`` in the safetensors metadata, so ``lora_alpha``
survives and a stock ``pipe.load_lora_weights("stage{k}")`` reads it), plus ``stage_adapter.json`` (the stage, its
timestep range and a fingerprint of the base weights the adapter was trained on) and, with DeMe's channel projection,
``channel_projection.safetensors``. ``stages.json`` sits at the root.
Stages trained on different machines are gathered by copying their ``stage{k}`` folders into one root.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..models import MultiDecoderUNet2DModel
from ..stages import TimestepStages
from ..utils import atomic_directory
from .norms_and_biases import check_peft_supports_norms_and_biases, drop_unmergeable_lora_biases, norm_module_names

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
STAGE_ADAPTER_CONFIG_NAME = "stage_adapter.json"
CHANNEL_PROJECTION_WEIGHT_NAME = "channel_projection.safetensors"
ALL_LINEAR_AND_CONV = "all-linear-conv"  # every nn.Linear and nn.Conv2d of the UNet
ATTENTION_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the former default: attention projections only
DEFAULT_TARGET_MODULES = (ALL_LINEAR_AND_CONV,)
UNet = Union[UNet2DConditionModel, UNet2DModel, MultiDecoderUNet2DModel]


# ---------------------------------------------------------------------------------------------------- fingerprint
def _base_name(name: str) -> str:
    """A parameter name as in the plain model: PEFT's ``.base_layer`` and ``.original_module`` removed."""
    return name.replace(".base_layer", "").replace(".original_module", "")


def base_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under their plain names (LoRA tensors and per-stage norm copies left out)."""
    return {
        _base_name(k): v for k, v in unet.state_dict().items() if "lora_" not in k and ".modules_to_save." not in k
    }


FINGERPRINT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def base_fingerprint(unet: torch.nn.Module, samples_per_tensor: int = 1024, precision: str = "float16") -> str:
    r"""
    A SHA-256 fingerprint of the base weights: the class name, every parameter name and shape, and up to
    ``samples_per_tensor`` evenly strided values of each tensor rounded to ``precision`` (so a half-precision copy of
    the same weights matches a float32 one, and hashing a Stable Diffusion UNet takes well under a second). Adapters
    record both precisions (`base_fingerprints`): a float16 copy matches the ``"float16"`` one, a bfloat16 copy the
    ``"bfloat16"`` one.

    Args:
        unet (`torch.nn.Module`): The base model, with or without PEFT layers injected.
        samples_per_tensor (`int`, defaults to 1024): Values sampled from each tensor.
        precision (`"float16"` or `"bfloat16"`, defaults to `"float16"`): The rounding of the sampled values.
    """
    if precision not in FINGERPRINT_DTYPES:
        raise ValueError(f"`precision` must be one of {sorted(FINGERPRINT_DTYPES)}, got {precision!r}.")
    h = hashlib.sha256(type(unet).__name__.encode())
    for name, tensor in sorted(base_state_dict(unet).items()):
        flat = tensor.detach().flatten()
        stride = max(1, flat.numel() // samples_per_tensor)
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        values = flat[::stride][:samples_per_tensor].to("cpu", FINGERPRINT_DTYPES[precision])
        h.update(values.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def resolve_target_modules(unet: torch.nn.Module, target_modules: Sequence[str]) -> list[str]:
    r"""
    The LoRA target modules: ``target_modules`` with ``"all-linear-conv"`` expanded to the full name of every
    ``nn.Linear`` and ``nn.Conv2d`` of ``unet`` (attention projections, feed-forwards, resnet and sampler convs,
    ``conv_in`` / ``conv_out``, time embedding, ``proj_in`` / ``proj_out``, shortcuts).

    Args:
        unet (`torch.nn.Module`): The plain base UNet.
        target_modules (`Sequence[str]`): PEFT module names, possibly including ``"all-linear-conv"``.
    """
    names = set(target_modules)
    if ALL_LINEAR_AND_CONV in names:
        names.discard(ALL_LINEAR_AND_CONV)
        names |= {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return sorted(names)


def base_fingerprints(unet: torch.nn.Module) -> dict[str, str]:
    """`base_fingerprint` in each precision, keyed by the precision name."""
    return {precision: base_fingerprint(unet, precision=precision) for precision in FINGERPRINT_DTYPES}


# ---------------------------------------------------------------------------------------------------- persistence
def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, shape: torch.Size) -> torch.Tensor:
    r"""
    The weight update ``scaling * B @ A`` of one LoRA layer, reshaped to the base weight's ``shape``. For a
    convolution ``A`` is ``[r, C_in, kh, kw]`` and ``B`` is ``[C_out, r, 1, 1]``, so ``B @ A`` contracts the rank.
    """
    delta = lora_b.flatten(1).double() @ lora_a.flatten(1).double()
    return (scaling * delta).reshape(shape)


def lora_scaling(config: LoraConfig) -> float:
    r"""The LoRA scale ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA): the update is ``scaling * B @ A``."""
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def lora_config_to_metadata(config: LoraConfig) -> dict:
    """The JSON-able subset of a ``LoraConfig`` that diffusers stores in the safetensors header."""
    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "lora_dropout", "bias", "rank_pattern")
    meta = {k: getattr(config, k) for k in (*keys, "lora_bias", "modules_to_save")}
    meta["alpha_pattern"] = dict(config.alpha_pattern or {})
    meta["rank_pattern"] = dict(meta["rank_pattern"] or {})
    meta["target_modules"] = sorted(meta["target_modules"])
    meta["modules_to_save"] = sorted(meta["modules_to_save"]) if meta["modules_to_save"] else None
    return meta


def read_lora_file(path: Union[str, os.PathLike], prefix: str = "unet") -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """
    Read a diffusers LoRA safetensors file: the state dict (``prefix.`` removed) and the ``LoraConfig`` from the
    metadata. A file without metadata is rejected: its ``lora_alpha`` would be guessed, i.e. silently wrong.
    """
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    if LORA_METADATA_KEY not in header:
        raise ValueError(
            f"{path} has no `{LORA_METADATA_KEY}` in its safetensors metadata, so its `lora_alpha` is unknown; save "
            "it with `StageLoraAdapters.save_pretrained` or pass `unet_lora_adapter_metadata` to diffusers."
        )
    packed = json.loads(header[LORA_METADATA_KEY])
    meta = {k[len(prefix) + 1 :]: v for k, v in packed.items() if k.startswith(prefix + ".")}
    if not meta:
        raise ValueError(f"{path} holds no LoRA metadata for the `{prefix}` component.")
    state = {k[len(prefix) + 1 :]: v for k, v in load_file(os.fspath(path)).items() if k.startswith(prefix + ".")}
    return state, LoraConfig(**meta)


def write_lora_file(path: Union[str, os.PathLike], state: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """
    Write ``state`` (PEFT's adapter-free names, from `get_peft_model_state_dict`) as the file ``path`` with diffusers'
    own writer, `StableDiffusionLoraLoaderMixin.save_lora_weights`: keys ``unet.<name>``, the ``LoraConfig`` packed as
    ``unet.<field>`` in the header. The metadata is `lora_config_to_metadata`'s subset rather than the whole
    ``LoraConfig.to_dict()`` of the diffusers examples because diffusers rebuilds it with ``LoraConfig(**metadata)``:
    a field that only a newer PEFT has would make the file unreadable with an older supported PEFT.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.save_lora_weights(
        os.path.dirname(os.fspath(path)) or ".",
        unet_lora_layers={k: v.detach().to("cpu").contiguous() for k, v in state.items()},
        weight_name=os.path.basename(os.fspath(path)),
        unet_lora_adapter_metadata=lora_config_to_metadata(config),
    )


@dataclass
class StageAdapterFiles:
    """One stage's adapter as read from disk (before it is attached to a model)."""

    stage: int
    state_dict: dict[str, torch.Tensor]
    config: LoraConfig
    info: dict
    channel_projection: dict[str, torch.Tensor] | None


def read_stage_adapters(
    adapters_dir: Union[str, os.PathLike], stages_to_load: Sequence[int] | None = None
) -> tuple[TimestepStages, list[StageAdapterFiles]]:
    r"""
    Read ``stages.json`` and every ``stage{k}`` folder from ``adapters_dir``, checking that no stage is missing and
    that all adapters agree on the rank, alpha and target modules and on the base model fingerprint.

    Args:
        adapters_dir (`str` or `os.PathLike`): The root written by `StageLoraAdapters.save_pretrained`.
        stages_to_load (`Sequence[int]`, *optional*): A subset of stages; all stages by default.
    """
    root = os.fspath(adapters_dir)
    stages = TimestepStages.from_pretrained(root)
    wanted = list(range(stages.num_stages)) if stages_to_load is None else list(stages_to_load)
    missing = [
        k
        for k in wanted
        if not os.path.isfile(os.path.join(root, stages.adapter_name(k), LORA_WEIGHT_NAME))
        or not os.path.isfile(os.path.join(root, stages.adapter_name(k), STAGE_ADAPTER_CONFIG_NAME))
    ]
    if missing:
        raise ValueError(
            f"`adapters_dir` {root} is missing the adapters of stage(s) {missing} of {stages.num_stages} "
            f"(expected folders {[stages.adapter_name(k) for k in missing]} with {LORA_WEIGHT_NAME} and "
            f"{STAGE_ADAPTER_CONFIG_NAME}); train them with `--stage k` and copy the folders here."
        )
    files = []
    for k in wanted:
        folder = os.path.join(root, stages.adapter_name(k))
        state, config = read_lora_file(os.path.join(folder, LORA_WEIGHT_NAME))
        with open(os.path.join(folder, STAGE_ADAPTER_CONFIG_NAME)) as f:
            info = json.load(f)
        if info.get("stage") != k or info.get("boundaries") != stages.boundaries:
            raise ValueError(
                f"{folder} was trained for stage {info.get('stage')} of boundaries {info.get('boundaries')}, not "
                f"stage {k} of {stages.boundaries} (from {root}/stages.json)."
            )
        proj_path = os.path.join(folder, CHANNEL_PROJECTION_WEIGHT_NAME)
        proj = load_file(proj_path) if os.path.isfile(proj_path) else None
        files.append(StageAdapterFiles(k, state, config, info, proj))
    _check_consistent(files)
    return stages, files


def _check_consistent(files: list[StageAdapterFiles]) -> None:
    ref = files[0]
    for other in files[1:]:
        for field in ("r", "lora_alpha", "use_rslora", "lora_bias"):
            a, b = getattr(ref.config, field), getattr(other.config, field)
            if a != b:
                raise ValueError(
                    f"Stage adapters disagree on `{field}`: stage {ref.stage} has {a}, stage {other.stage} has {b}; "
                    "all stages must be trained with the same `--rank`, `--lora_alpha` and `--train_norms_and_biases`."
                )
        for field in ("target_modules", "modules_to_save"):
            a, b = sorted(getattr(ref.config, field) or []), sorted(getattr(other.config, field) or [])
            if a != b:
                raise ValueError(
                    f"Stage adapters disagree on `{field}`: stage {ref.stage} has {len(a)} modules, stage "
                    f"{other.stage} has {len(b)} (differing: {sorted(set(a) ^ set(b))[:3]})."
                )
        if ref.info.get("base_fingerprint") != other.info.get("base_fingerprint"):
            raise ValueError(
                f"Stage adapters {ref.stage} and {other.stage} were trained on different base models (fingerprints "
                f"{ref.info.get('base_fingerprint')} vs {other.info.get('base_fingerprint')})."
            )
        if (ref.channel_projection is None) != (other.channel_projection is None):
            raise ValueError("Either every stage adapter has a channel projection or none does.")
    if any(f.config.use_dora for f in files):
        raise ValueError("DoRA adapters (`use_dora=True`) are not supported: their merge is not linear.")


def check_base_model(unet: torch.nn.Module, info: dict, fingerprint: str | None = None) -> None:
    """
    Raise a `ValueError` when ``unet`` is not the base model that an adapter's ``info`` was trained on. The weights
    match in float16 rounding (``base_fingerprint``, given as ``fingerprint`` when already computed) or in bfloat16
    rounding (``base_fingerprints["bfloat16"]``, recorded by newer adapters), so float32, float16 and bfloat16 copies
    of the base all pass.
    """
    expected = info.get("base_fingerprint")
    actual = fingerprint or base_fingerprint(unet)
    if expected == actual:
        return
    expected_bf16 = (info.get("base_fingerprints") or {}).get("bfloat16")
    if expected_bf16 is not None and expected_bf16 == base_fingerprint(unet, precision="bfloat16"):
        return
    raise ValueError(
        f"The `unet` is not the base model these adapters were trained on: its weights fingerprint is {actual}, "
        f"the adapters expect {expected} (base `{info.get('base_model')}`). Load the same pretrained UNet."
    )


# ---------------------------------------------------------------------------------------------------- adapters
class StageLoraAdapters:
    r"""
    One LoRA adapter per timestep stage on a `UNet2DConditionModel` or `UNet2DModel` (injected with
    ``peft.inject_adapter_in_model``, which works for both), with stage switching, weighted activation, a context that
    disables every adapter (the frozen teacher of DeMe's consistency loss) and per-stage save / load.

    With weights ``w_k`` active, every adapted layer computes ``W x + sum_k w_k (alpha / r) B_k A_k x``: exactly the
    merged model of `merge_stage_adapters`. With per-stage norms and biases (``config.modules_to_save`` and
    ``config.lora_bias``, see `diffusers_stages.deme.norms_and_biases`) an adapted layer adds
    ``sum_k w_k (alpha / r) b_k`` and stage ``k``'s norm copies replace the norms; those copies hold one stage's
    values, so such adapters activate one stage at weight 1 (or none), and weighted combinations exist merged.

    Args:
        unet (`UNet2DConditionModel`, `UNet2DModel` or `MultiDecoderUNet2DModel`): The base model; adapters are
            injected in place (a multi-decoder model: into the encoder and every decoder).
        stages (`TimestepStages`): One adapter per stage, named ``stages.adapter_name(k)``.
        config (`LoraConfig`): Rank, alpha, target modules, and the per-stage norms (``modules_to_save``) and biases
            (``lora_bias``), shared by all stages.
        channel_projection (`bool`, defaults to `False`): Also give each stage DeMe's channel-wise projection
            (see `diffusers_stages.deme.ChannelProjection`).
        base_model (`str`, *optional*): The base model's name or path, recorded with the adapters.
    """

    def __init__(
        self,
        unet: UNet,
        stages: TimestepStages,
        config: LoraConfig,
        channel_projection: bool = False,
        base_model: str | None = None,
    ):
        from .projection import ChannelProjection

        if not isinstance(unet, (UNet2DConditionModel, UNet2DModel, MultiDecoderUNet2DModel)):
            raise ValueError(
                "`unet` must be a UNet2DConditionModel, UNet2DModel or MultiDecoderUNet2DModel, got "
                f"{type(unet).__name__}."
            )
        if any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in unet.modules()):
            raise ValueError("`unet` already has PEFT adapters; pass the plain base model.")
        self.unet, self.stages, self.config, self.base_model = unet, stages, config, base_model
        self.fingerprints = base_fingerprints(unet)
        self.fingerprint = self.fingerprints["float16"]
        self.training: dict = {}  # training settings recorded with the adapters (filled by the training script)
        with warnings.catch_warnings():  # PEFT warns on every adapter after the first: several are the point here
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            warnings.filterwarnings("ignore", message=".*lora_bias=True.*has no bias")  # dropped just below
            for name in stages.adapter_names:
                inject_adapter_in_model(config, unet, adapter_name=name)
                drop_unmergeable_lora_biases(unet, name)
        if not any(isinstance(m, LoraLayer) for m in unet.modules()):
            raise ValueError(f"`target_modules` {sorted(config.target_modules)} matched no layer of the `unet`.")
        if len(list(self.norm_copies)) != len(config.modules_to_save or []):
            raise ValueError(
                f"`modules_to_save` {sorted(config.modules_to_save)[:3]}... are not all norms of the `unet`."
            )
        self.projection = ChannelProjection(unet, stages.adapter_names) if channel_projection else None
        self.set_stage(0)

    @classmethod
    def attach(
        cls,
        unet: UNet,
        stages: TimestepStages,
        rank: int = 4,
        lora_alpha: float | None = None,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        channel_projection: bool = False,
        base_model: str | None = None,
        init_lora_weights: bool = True,
        train_norms_and_biases: bool = False,
    ) -> StageLoraAdapters:
        """
        Attach fresh adapters (rank ``rank``, ``lora_alpha`` defaulting to the rank, as in diffusers' scripts).
        ``init_lora_weights=True`` is PEFT's default: ``B = 0``, so every adapter starts as a no-op.
        ``train_norms_and_biases`` also gives each stage its own copy of every affine ``GroupNorm`` / ``LayerNorm``
        (starting at the base values) and a bias update (starting at 0) on every adapted layer with a bias.
        """
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"`rank` must be a positive int, got {rank!r}.")
        if train_norms_and_biases:
            check_peft_supports_norms_and_biases()
        config = LoraConfig(
            r=rank,
            lora_alpha=rank if lora_alpha is None else lora_alpha,
            target_modules=resolve_target_modules(unet, target_modules),
            init_lora_weights=init_lora_weights,
            modules_to_save=norm_module_names(unet) if train_norms_and_biases else None,
            lora_bias=train_norms_and_biases,
        )
        return cls(unet, stages, config, channel_projection=channel_projection, base_model=base_model)

    @classmethod
    def from_pretrained(
        cls, unet: UNet, adapters_dir: Union[str, os.PathLike], stages_to_load: Sequence[int] | None = None
    ) -> StageLoraAdapters:
        """
        Attach the adapters saved under ``adapters_dir`` to ``unet``, after checking that no stage is missing, that the
        adapters agree with each other and that ``unet`` is the base model they were trained on.
        """
        stages, files = read_stage_adapters(adapters_dir, stages_to_load)
        check_base_model(unet, files[0].info)
        adapters = cls(
            unet,
            stages,
            files[0].config,
            channel_projection=files[0].channel_projection is not None,
            base_model=files[0].info.get("base_model"),
        )
        for f in files:
            adapters.load_stage_state_dict(f.stage, f.state_dict, f.channel_projection)
        return adapters

    # ------------------------------------------------------------------ activation
    @property
    def lora_layers(self) -> Iterator[LoraLayer]:
        return (m for m in self.unet.modules() if isinstance(m, LoraLayer))

    @property
    def norm_copies(self) -> Iterator[ModulesToSaveWrapper]:
        """The per-stage norm copies (one PEFT ``ModulesToSaveWrapper`` per norm; none by default)."""
        return (m for m in self.unet.modules() if isinstance(m, ModulesToSaveWrapper))

    def set_weights(self, weights: Sequence[float]) -> None:
        r"""
        Activate every stage at once, stage ``k`` scaled by ``weights[k]``: ``W + sum_k w_k (alpha/r) B_k A_k``. With
        per-stage norms only one stage at weight 1 (or none) can be active (their copies hold one stage's values).
        """
        weights = [float(w) for w in weights]
        if len(weights) != self.stages.num_stages:
            raise ValueError(f"`weights` must hold one weight per stage ({self.stages.num_stages}), got {weights}.")
        names = self.stages.adapter_names
        self.active = ("weights", weights)
        for layer in self.lora_layers:
            layer.set_adapter(names)
            layer.enable_adapters(True)
            for name, w in zip(names, weights):
                layer.set_scale(name, w)
        self._activate_norm_copies(weights)
        if self.projection is not None:
            self.projection.set_weights(dict(zip(names, weights)))

    def _activate_norm_copies(self, weights: list[float]) -> None:
        """Run stage ``k``'s norm copies for weights ``e_k``, the base norms for all-zero weights."""
        active = [k for k, w in enumerate(weights) if w != 0.0]
        copies = list(self.norm_copies)
        if copies and (len(active) > 1 or any(weights[k] != 1.0 for k in active)):
            raise ValueError(
                f"Per-stage norms run one stage at weight 1 at a time, got `weights` {weights}; weighted "
                "combinations of stages with norms exist merged (`merge_stage_adapters`)."
            )
        for wrapper in copies:
            wrapper.set_adapter([self.stages.adapter_name(k) for k in active])

    def set_stage(self, stage: int) -> None:
        """Activate only the adapter of ``stage`` (weight 1)."""
        self.stages._check_stage(stage)
        self.set_weights([1.0 if k == stage else 0.0 for k in range(self.stages.num_stages)])
        name = self.stages.adapter_name(stage)
        self.active = ("stage", stage)
        for layer in self.lora_layers:
            layer.set_adapter(name)
        # `set_adapter` makes the active adapter trainable and freezes the others; the base stays frozen.

    @contextmanager
    def disabled(self):
        """Run the plain base model (every adapter and projection off), restoring the previous state on exit."""
        layers = [*self.lora_layers, *self.norm_copies]
        before = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer.enable_adapters(False)
        proj_before = self.projection.enabled if self.projection is not None else None
        if self.projection is not None:
            self.projection.enabled = False
        try:
            yield self.unet
        finally:
            for layer, was_disabled in zip(layers, before):
                layer.enable_adapters(not was_disabled)
            if self.projection is not None:
                self.projection.enabled = proj_before

    def restore(self, active: tuple) -> None:
        """Re-activate a state saved from ``self.active`` (``("stage", k)`` or ``("weights", [w_0, ...])``)."""
        kind, value = active
        self.set_stage(value) if kind == "stage" else self.set_weights(value)

    # ------------------------------------------------------------------ parameters and state
    def parameters(self, stage: int) -> list[torch.nn.Parameter]:
        """The trainable parameters of one stage: its LoRA matrices and, if any, LoRA biases, norm copies and channel
        projections."""
        return [p for _, p in self.named_parameters(stage)]

    def named_parameters(self, stage: int) -> list[tuple[str, torch.nn.Parameter]]:
        """`parameters` with their names (the UNet's, ``channel_projection.<adapter>.<site>`` for projections)."""
        name = self.stages.adapter_name(stage)
        named = [
            (n, p)
            for n, p in self.unet.named_parameters()
            if ("lora_" in n or ".modules_to_save." in n) and f".{name}." in n + "."
        ]
        if self.projection is not None:
            sites = self.projection.sites
            named += [
                (f"channel_projection.{name}.{s}", p) for s, p in zip(sites, self.projection.stage_parameters(name))
            ]
        return named

    def stage_state_dict(self, stage: int) -> dict[str, torch.Tensor]:
        """Stage ``stage``'s LoRA tensors under PEFT's adapter-free names (``...to_q.lora_A.weight``; norm copies under
        the norm's own names, ``...norm1.weight``)."""
        with warnings.catch_warnings():  # PEFT takes 1-D LoRA tensors (our `lora_B` biases) for unsharded ZeRO-3 ones
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            return get_peft_model_state_dict(self.unet, adapter_name=self.stages.adapter_name(stage))

    def load_stage_state_dict(
        self, stage: int, state_dict: dict[str, torch.Tensor], channel_projection: dict | None = None
    ) -> None:
        expected = set(self.stage_state_dict(stage))
        if set(state_dict) != expected:
            extra, lacking = sorted(set(state_dict) - expected)[:3], sorted(expected - set(state_dict))[:3]
            raise ValueError(
                f"The adapter of stage {stage} does not fit this `unet`: unexpected keys {extra}, missing {lacking}."
            )
        result = set_peft_model_state_dict(self.unet, state_dict, adapter_name=self.stages.adapter_name(stage))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"Unexpected LoRA keys for stage {stage}: {result.unexpected_keys[:3]}.")
        if channel_projection is not None:
            if self.projection is None:
                raise ValueError("These adapters have no channel projection but one was given.")
            self.projection.load_stage_state_dict(self.stages.adapter_name(stage), channel_projection)

    def stage_info(self, stage: int) -> dict:
        return {
            "stage": stage,
            "adapter_name": self.stages.adapter_name(stage),
            "timestep_range": list(self.stages.timestep_range(stage)),
            "boundaries": self.stages.boundaries,
            "num_train_timesteps": self.stages.num_train_timesteps,
            "base_model": self.base_model,
            "base_class": type(self.unet).__name__,
            "base_fingerprint": self.fingerprint,
            "base_fingerprints": self.fingerprints,
            "lora_scaling": lora_scaling(self.config),
            "training": self.training,
        }

    def save_pretrained(self, save_directory: Union[str, os.PathLike], stages: Sequence[int] | None = None) -> None:
        """
        Write ``stages.json`` and the folder ``stage{k}`` of each stage in ``stages`` (all by default) atomically.
        Folders of other stages already in ``save_directory`` are kept, so single-stage runs can share one root.
        """
        save_directory = os.fspath(save_directory)
        wanted = list(range(self.stages.num_stages)) if stages is None else list(stages)
        os.makedirs(save_directory, exist_ok=True)
        self.stages.save_pretrained(save_directory)
        for k in wanted:
            with atomic_directory(os.path.join(save_directory, self.stages.adapter_name(k))) as tmp:
                write_lora_file(os.path.join(tmp, LORA_WEIGHT_NAME), self.stage_state_dict(k), self.config)
                with open(os.path.join(tmp, STAGE_ADAPTER_CONFIG_NAME), "w") as f:
                    json.dump(self.stage_info(k), f, indent=2)
                if self.projection is not None:  # not LoRA: diffusers' LoRA format has no place for it
                    state = self.projection.stage_state_dict(self.stages.adapter_name(k))
                    save_file(state, os.path.join(tmp, CHANNEL_PROJECTION_WEIGHT_NAME))

"""`MultiDecoderUNet2DConditionModel`: a Stable Diffusion `UNet2DConditionModel` with one decoder per timestep stage."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Union

import torch
from diffusers import ModelMixin, UNet2DConditionModel  # `ModelMixin` must be an attribute here for pipeline loading
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils import apply_lora_scale

from .multi_decoder import MultiDecoderMixin, take

_UNET_ARGS = [name for name in inspect.signature(UNet2DConditionModel.__init__).parameters if name != "self"]


@dataclass
class _Encoded:
    """What the shared encoder hands to a decoder."""

    hidden: torch.Tensor
    emb: torch.Tensor
    skips: tuple
    attn: dict
    mid_residual: torch.Tensor | None
    batch: int
    forward_upsample_size: bool


class MultiDecoderUNet2DConditionModel(MultiDecoderMixin, ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A `UNet2DConditionModel` (Stable Diffusion) whose decoder is replicated per timestep stage.

    The shared encoder is everything of the stock UNet before the up blocks (time / class / added embeddings,
    ``encoder_hid_proj``, ``conv_in``, ``down_blocks``, ``mid_block``); ``decoders[k]`` holds the ``up_blocks`` (with
    their cross-attention) and ``conv_norm_out`` / ``conv_act`` / ``conv_out`` of stage ``k``. ``forward`` has the
    stock signature and output, so the model is a drop-in for `StableDiffusionPipeline` and the diffusers training
    scripts. PEFT adapters attach with `add_adapter`; `lora_target_modules` builds ``target_modules`` patterns for
    the encoder (modules outside ``decoders.*``), one decoder (``decoders.k.*``) or all; `load_lora_adapter` (so
    ``pipe.load_lora_weights``) loads a LoRA trained on the stock UNet into the encoder and every decoder. Model-level
    switches work as on the stock UNet and reach every decoder: `enable_gradient_checkpointing`,
    `set_attention_slice` (``pipe.enable_attention_slicing()``), `set_attn_processor` / `set_default_attn_processor`,
    `enable_freeu` / `disable_freeu`, ``_no_split_modules`` for ``device_map``.

    Args:
        stage_boundaries (`list[float]`, defaults to `[500]`):
            The ``K - 1`` strictly increasing interior boundaries in the units of the ``timestep`` argument.
        num_train_timesteps (`int`, defaults to 1000): the length ``T`` of the training time grid.
        decoder_block_out_channels (`list[list[int]]`, *optional*):
            Per-stage decoder widths (one list per stage, in the order of ``block_out_channels``); ``None`` gives
            every decoder the encoder's widths. Widths must be multiples of ``norm_num_groups`` and, at
            cross-attention levels, of the number of attention heads.
        decoder_norm_num_groups (`list[int]`, *optional*):
            The GroupNorm groups of each stage's decoder; ``None`` uses ``norm_num_groups`` everywhere.
        decoder_includes_mid_block (`bool`, defaults to `False`):
            ``True``: every decoder has its own copy of the mid block (``decoders[k].mid_block``) and the encoder none.
        **UNet2DConditionModel arguments**: all other arguments are `UNet2DConditionModel`'s (GLIGEN's
            ``attention_type="gated"`` is not supported).
    """

    _unet_class = UNet2DConditionModel
    _no_split_modules = UNet2DConditionModel._no_split_modules
    _repeated_blocks = UNet2DConditionModel._repeated_blocks
    _encoder_modules = (
        "conv_in",
        "time_proj",
        "time_embedding",
        "encoder_hid_proj",
        "class_embedding",
        "add_embedding",
        "add_time_proj",
        "time_embed_act",
        "down_blocks",
        "mid_block",
    )

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int] = 1280,
        transformer_layers_per_block: int | tuple[int] | tuple[tuple] = 1,
        reverse_transformer_layers_per_block: tuple[tuple[int]] | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int] = 8,
        num_attention_heads: int | tuple[int] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
        num_train_timesteps: int = 1000,
        stage_boundaries: list[float] = (500,),
        decoder_block_out_channels: list[list[int]] | None = None,
        decoder_norm_num_groups: list[int] | None = None,
        decoder_includes_mid_block: bool = False,
    ):
        super().__init__()
        if attention_type != "default":
            raise ValueError(f"`attention_type` must be 'default' for a multi-decoder UNet, got {attention_type!r}.")
        self.sample_size = sample_size
        self._build({name: self.config[name] for name in _UNET_ARGS})
        self.num_upsamplers = len(block_out_channels) - 1

    def _attention_divisor(self, level: int) -> int | None:
        config = self.config
        if "CrossAttn" not in config.up_block_types[len(config.block_out_channels) - 1 - level]:
            return None
        heads = config.num_attention_heads or config.attention_head_dim
        return heads if isinstance(heads, int) else heads[level]

    # the stock embedding helpers only read attributes and config entries this class shares with the stock UNet
    get_time_embed = UNet2DConditionModel.get_time_embed
    get_class_embed = UNet2DConditionModel.get_class_embed
    get_aug_embed = UNet2DConditionModel.get_aug_embed
    process_encoder_hidden_states = UNet2DConditionModel.process_encoder_hidden_states

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        r"""
        `UNet2DConditionModel.enable_freeu` (FreeU, https://huggingface.co/papers/2309.11497) on the up blocks of
        every decoder: ``s1`` / ``s2`` scale the skip features and ``b1`` / ``b2`` the backbone features of the first
        two up levels.
        """
        for decoder in self.decoders:
            for block in decoder.up_blocks:
                block.s1, block.s2, block.b1, block.b2 = s1, s2, b1, b2

    def disable_freeu(self) -> None:
        """Disables FreeU in every decoder."""
        self.enable_freeu(None, None, None, None)

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        stage: int | None = None,
    ) -> Union[UNet2DConditionOutput, tuple]:
        r"""
        The arguments are `UNet2DConditionModel.forward`'s. ``timestep`` is one value for the whole batch (one decoder
        runs) or one per sample (each decoder used by the batch runs once on its sub-batch; the per-sample tensors
        ``encoder_hidden_states``, the attention masks and the embeddings are split with it, while tensors inside
        ``cross_attention_kwargs`` are passed unchanged). ControlNet residuals (``down_block_additional_residuals``
        with ``mid_block_additional_residual``) are supported; T2I-Adapter residuals
        (``down_intrablock_additional_residuals``) are not. ``stage`` (`int`, *optional*): the stage of the whole
        batch when the caller knows it; that decoder runs and the timesteps are not read (no host sync, no graph
        break under `torch.compile`). Trusted, not checked against ``timestep``.

        Returns:
            `UNet2DConditionOutput` or `tuple`: the model output.
        """
        if down_intrablock_additional_residuals is not None or (
            down_block_additional_residuals is not None and mid_block_additional_residual is None
        ):
            raise ValueError("T2I-Adapter residuals (`down_intrablock_additional_residuals`) are not supported.")
        batch = sample.shape[0]
        self._check_timestep(timestep, batch)
        sample, emb, attn = self._embed(
            sample,
            timestep,
            encoder_hidden_states,
            class_labels=class_labels,
            timestep_cond=timestep_cond,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )
        hidden, skips = self._encode(sample, emb, attn, down_block_additional_residuals, mid_block_additional_residual)
        up_factor = 2**self.num_upsamplers
        encoded = _Encoded(
            hidden=hidden,
            emb=emb,
            skips=skips,
            attn=attn,
            mid_residual=mid_block_additional_residual,
            batch=batch,
            forward_upsample_size=any(dim % up_factor != 0 for dim in sample.shape[-2:]),
        )

        def decode(k: int, index: torch.Tensor | None) -> torch.Tensor:
            return self._decode(k, index, encoded)

        out = self._route(timestep, stage, decode)
        if not return_dict:
            return (out,)
        return UNet2DConditionOutput(sample=out)

    def _embed(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        *,
        class_labels,
        timestep_cond,
        attention_mask,
        cross_attention_kwargs,
        added_cond_kwargs,
        encoder_attention_mask,
    ):
        """The input, the time (+ class / added) embedding and the attention arguments, as `UNet2DConditionModel`."""
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = self.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        aug_emb = self.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        if self.config.addition_embed_type == "image_hint":
            aug_emb, hint = aug_emb
            sample = torch.cat([sample, hint], dim=1)
        emb = emb + aug_emb if aug_emb is not None else emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        encoder_hidden_states = self.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        attn = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            encoder_attention_mask=encoder_attention_mask,
        )
        return sample, emb, attn

    def _encode(self, sample, emb, attn, down_residuals, mid_residual):
        """The shared encoder: ``conv_in``, the down blocks (their skip features) and the shared mid block."""
        hidden = self.conv_in(sample)
        skips = (hidden,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden_states=hidden, temb=emb, **attn)
            else:
                hidden, res = block(hidden_states=hidden, temb=emb)
            skips += res
        if down_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_residuals))
        if self.mid_block is not None:
            hidden = _run_mid_block(self.mid_block, hidden, emb, attn)
            if mid_residual is not None:
                hidden = hidden + mid_residual
        return hidden, skips

    def _decode(self, k: int, index: torch.Tensor | None, encoded: _Encoded) -> torch.Tensor:
        """Decoder ``k`` on the samples ``index`` (all when `None`): its mid block if it has one, up blocks, output."""
        decoder, batch = self.decoders[k], encoded.batch
        x, temb = take(encoded.hidden, index, batch), take(encoded.emb, index, batch)
        res = take(encoded.skips, index, batch)
        attn = {n: v if n == "cross_attention_kwargs" else take(v, index, batch) for n, v in encoded.attn.items()}
        if decoder.mid_block is not None:
            x = _run_mid_block(decoder.mid_block, x, temb, attn)
            if encoded.mid_residual is not None:
                x = x + take(encoded.mid_residual, index, batch)
        for i, block in enumerate(decoder.up_blocks):
            res_block, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
            is_final = i == len(decoder.up_blocks) - 1
            upsample_size = res[-1].shape[2:] if encoded.forward_upsample_size and not is_final else None
            kwargs = attn if getattr(block, "has_cross_attention", False) else {}
            x = block(
                hidden_states=x, temb=temb, res_hidden_states_tuple=res_block, upsample_size=upsample_size, **kwargs
            )
        if decoder.conv_norm_out is not None:
            x = decoder.conv_act(decoder.conv_norm_out(x))
        return decoder.conv_out(x)


def _run_mid_block(mid_block, hidden: torch.Tensor, emb: torch.Tensor, attn: dict) -> torch.Tensor:
    """The mid block as `UNet2DConditionModel` calls it (with the cross-attention arguments if it has attention)."""
    if getattr(mid_block, "has_cross_attention", False):
        return mid_block(hidden, emb, **attn)
    return mid_block(hidden, emb)


def _register_adapter_scale_expansion() -> None:
    """
    `PeftAdapterMixin.set_adapters` looks up a per-class scale expansion by class name; diffusers < 0.42 keeps them
    in a plain dict (a `KeyError` for any class it does not know). Register ours as diffusers >= 0.42's default does:
    weights pass unchanged (per-block scale dicts are not expanded for the decoders).
    """
    from diffusers.loaders import peft as diffusers_peft

    mapping = getattr(diffusers_peft, "_SET_ADAPTER_SCALE_FN_MAPPING", None)
    if mapping is not None:
        mapping.setdefault(MultiDecoderUNet2DConditionModel.__name__, lambda model, weights: weights)


_register_adapter_scale_expansion()

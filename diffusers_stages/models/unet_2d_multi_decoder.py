"""`MultiDecoderUNet2DModel`: a pixel-space `UNet2DModel` with one shared encoder and one decoder per timestep stage."""

from __future__ import annotations

import inspect
from typing import Union

import torch
from diffusers import ModelMixin, UNet2DModel  # `ModelMixin` must be an attribute here for DiffusionPipeline loading
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from .multi_decoder import MultiDecoderMixin, take

_UNET_ARGS = [name for name in inspect.signature(UNet2DModel.__init__).parameters if name != "self"]


class MultiDecoderUNet2DModel(MultiDecoderMixin, ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A `UNet2DModel` whose decoder is replicated per timestep stage (the multi-stage framework's multi-decoder U-Net).

    The shared encoder is ``time_proj``, ``time_embedding``, ``class_embedding``, ``conv_in``, ``down_blocks`` and
    ``mid_block``; ``decoders[k]`` holds the ``up_blocks`` and ``conv_norm_out`` / ``conv_act`` / ``conv_out`` of stage
    ``k``. A sample with timestep ``t`` is decoded by stage :math:`k = \#\{b \in \text{stage\_boundaries} : b \le t\}`
    (stage 0 is the least noisy). ``forward`` has `UNet2DModel`'s signature and output, so the model is a drop-in for
    `DDPMPipeline`, `DDIMPipeline` and training scripts. Model-level switches work as on the stock UNet and reach every
    decoder: `enable_gradient_checkpointing`, `set_attention_slice` (so `pipe.enable_attention_slicing()`),
    `set_attn_processor` / `set_default_attn_processor`; `load_lora_adapter` loads a stock-UNet LoRA into every decoder.

    Args:
        stage_boundaries (`list[float]`, defaults to `[500]`):
            The ``K - 1`` strictly increasing interior boundaries, in the units of the ``timestep`` the model receives
            (integer training timesteps for DDPM-style schedulers, any float for EDM-style conditioning).
        num_train_timesteps (`int`, defaults to 1000):
            The length ``T`` of the training time grid (used by the `stages` property, and by
            ``time_embedding_type="learned"`` as in `UNet2DModel`).
        decoder_block_out_channels (`list[list[int]]`, *optional*):
            The widths of each stage's decoder, one list per stage in the order of ``block_out_channels`` (highest
            resolution first). ``None`` gives every decoder the encoder's widths. The paper's tailored decoders give
            the least noisy stage the widest decoder, e.g. ``[[192, ...], [128, ...], [16, ...]]`` for a
            128-channel encoder. Every width must be a multiple of ``norm_num_groups`` (and of
            ``attention_head_dim`` at attention levels).
        decoder_norm_num_groups (`list[int]`, *optional*):
            The GroupNorm groups of each stage's decoder; ``None`` uses ``norm_num_groups`` everywhere. Narrow decoders
            need fewer groups: the paper's 16-channel CIFAR decoder (``[16, 32, 32, 32]`` over a 128-channel encoder)
            builds with 4 groups (the authors' EDM code uses ``min(32, C / 4)`` groups per layer). Each decoder width
            and each decoder-plus-skip width must be a multiple of its decoder's groups.
        decoder_includes_mid_block (`bool`, defaults to `False`):
            ``True``: every decoder has its own mid block (``decoders[k].mid_block``, at the encoder's deepest width
            and GroupNorm groups, as in the multi-stage authors' EDM code) and the encoder has none.
        **UNet2DModel arguments**: all other arguments are `UNet2DModel`'s and mean the same (the ``Skip`` block
            types are not supported).
    """

    _unet_class = UNet2DModel
    _encoder_modules = ("conv_in", "time_proj", "time_embedding", "class_embedding", "down_blocks", "mid_block")

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int = 1000,
        stage_boundaries: list[float] = (500,),
        decoder_block_out_channels: list[list[int]] | None = None,
        decoder_norm_num_groups: list[int] | None = None,
        decoder_includes_mid_block: bool = False,
    ):
        super().__init__()
        skip_types = [t for t in (*down_block_types, *up_block_types) if "Skip" in t]
        if skip_types:
            raise ValueError(f"`down_block_types` / `up_block_types`: the Skip blocks {skip_types} are not supported.")
        self.sample_size = sample_size
        self._build({name: self.config[name] for name in _UNET_ARGS})

    def _attention_divisor(self, level: int) -> int | None:
        up_type = self.config.up_block_types[len(self.config.block_out_channels) - 1 - level]
        return self.config.attention_head_dim if "Attn" in up_type else None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        stage: int | None = None,
    ) -> Union[UNet2DOutput, tuple]:
        r"""
        Args:
            sample (`torch.Tensor`): the noisy input, shape ``(batch, channel, height, width)``.
            timestep (`torch.Tensor` or `float` or `int`):
                One timestep for the whole batch (a scalar or 1-element tensor: one decoder runs on the batch) or one
                per sample (each decoder used by the batch runs once on its sub-batch).
            class_labels (`torch.Tensor`, *optional*): class labels, as in `UNet2DModel`.
            return_dict (`bool`, defaults to `True`): return a `UNet2DOutput` instead of a tuple.
            stage (`int`, *optional*):
                The stage of the whole batch, when the caller knows it: that decoder runs and the timesteps are not
                read (no host sync, no graph break under `torch.compile`). Trusted, not checked against ``timestep``.

        Returns:
            `UNet2DOutput` or `tuple`: the model output, shape of ``sample`` with ``out_channels`` channels.
        """
        batch = sample.shape[0]
        self._check_timestep(timestep, batch)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # shared encoder (as UNet2DModel)
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(batch, dtype=timesteps.dtype, device=timesteps.device)
        # the sample's dtype, not `self.dtype`: that walks every module (all decoders) on each call, and under
        # `torch.compile` every module walked is a guard checked on each call
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("`class_labels` must be given: this model is class-conditional.")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=sample.dtype)
        elif class_labels is not None:
            raise ValueError("`class_labels` given, but this model has no class embedding (`num_class_embeds`).")

        hidden = self.conv_in(sample)
        skips = (hidden,)
        for block in self.down_blocks:
            hidden, res = block(hidden_states=hidden, temb=emb)
            skips += res
        if self.mid_block is not None:
            hidden = self.mid_block(hidden, emb)

        def decode(k: int, index: torch.Tensor | None) -> torch.Tensor:
            decoder = self.decoders[k]
            x, temb, res = take(hidden, index, batch), take(emb, index, batch), take(skips, index, batch)
            if decoder.mid_block is not None:
                x = decoder.mid_block(x, temb)
            for block in decoder.up_blocks:
                x = block(x, res[-len(block.resnets) :], temb)
                res = res[: -len(block.resnets)]
            return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))

        out = self._route(timestep, stage, decode)
        if self.config.time_embedding_type == "fourier":
            out = out / timesteps.reshape(batch, *([1] * (out.ndim - 1)))
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

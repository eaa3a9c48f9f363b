"""What the two multi-decoder U-Nets share: per-stage decoders, routing by timestep, and building from a UNet.

A multi-decoder U-Net (the multi-stage framework, METHODS.md section 2) keeps the *encoder* of a diffusers UNet
(time embedding, ``conv_in``, the down blocks and the mid block) once and holds one *decoder* per timestep stage
(the up blocks with their skip connections, plus ``conv_norm_out`` / ``conv_act`` / ``conv_out``) in
``model.decoders[k]``. Module names are the stock UNet's, so ``down_blocks.1.attentions.0...`` is an encoder module
and ``decoders.2.up_blocks.0...`` a module of the decoder of stage 2. With ``decoder_includes_mid_block=True`` (the
multi-stage authors' EDM variant) the mid block moves from the encoder into every decoder (``decoders.k.mid_block``).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Literal, Union

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..stages import TimestepStages
from .decoder_lora import DecoderLoraLoaderMixin
from .routing import StageRoutingMixin

DECODER_MODULES = ("up_blocks", "conv_norm_out", "conv_act", "conv_out")
DEFAULT_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")


class StageDecoder(nn.Module):
    """
    The decoder of one stage: the up blocks (with skip connections) and the output head of a diffusers UNet, and
    the mid block when the decoders include it (``mid_block`` is ``None`` otherwise).
    """

    def __init__(
        self,
        up_blocks: nn.ModuleList,
        conv_norm_out: nn.Module | None,
        conv_act,
        conv_out: nn.Module,
        mid_block: nn.Module | None = None,
    ):
        super().__init__()
        self.mid_block = mid_block
        self.up_blocks = up_blocks
        self.conv_norm_out = conv_norm_out
        self.conv_act = conv_act
        self.conv_out = conv_out

    @property
    def block_out_channels(self) -> list[int]:
        """The widths of the decoder's levels, from the highest resolution to the lowest (the encoder's order)."""
        return [block.resnets[-1].out_channels for block in reversed(self.up_blocks)]


def encoder_skip_channels(conv_in: nn.Conv2d, down_blocks: nn.ModuleList) -> list[int]:
    """Channel counts of the skip tensors the encoder hands to the decoder, in the order they are produced."""
    skips = [conv_in.out_channels]
    for block in down_blocks:
        skips += [resnet.out_channels for resnet in block.resnets]
        if getattr(block, "downsamplers", None) is not None:
            skips += [down.out_channels for down in block.downsamplers]
    return skips


def fit_decoder_to_encoder(decoder: StageDecoder, skip_channels: list[int], mid_channels: int, stage: int) -> None:
    """
    Rewire the input side of every decoder resnet to ``hidden + skip`` channels, where ``hidden`` is the decoder's
    own width (or the encoder's mid-block width for the first resnet) and ``skip`` the encoder's skip width.

    A diffusers up block assumes that the encoder and the decoder have the same widths; a tailored decoder does not,
    so the resnets that read a concatenation of mismatching widths get a new ``norm1`` / ``conv1`` /
    ``conv_shortcut``. A decoder as wide as the encoder is left untouched (it stays a stock up block).
    """
    skips = list(skip_channels)
    hidden = mid_channels
    for block in decoder.up_blocks:
        block_skips = skips[-len(block.resnets) :]
        del skips[-len(block.resnets) :]
        for resnet, skip in zip(block.resnets, reversed(block_skips)):
            in_channels = hidden + skip
            if resnet.in_channels != in_channels:
                if in_channels % resnet.norm1.num_groups:
                    raise ValueError(
                        f"decoder {stage}: a resnet reads {hidden} decoder + {skip} encoder channels, which "
                        f"{resnet.norm1.num_groups} GroupNorm groups do not divide; choose `decoder_norm_num_groups"
                        f"[{stage}]` dividing both its widths and the encoder's."
                    )
                _rewire_resnet_input(resnet, in_channels)
            hidden = resnet.out_channels


def _rewire_resnet_input(resnet: nn.Module, in_channels: int) -> None:
    out_channels = resnet.conv1.out_channels
    resnet.in_channels = in_channels
    resnet.norm1 = nn.GroupNorm(resnet.norm1.num_groups, in_channels, eps=resnet.norm1.eps, affine=True)
    resnet.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
    resnet.use_in_shortcut = in_channels != resnet.conv2.out_channels
    resnet.conv_shortcut = (
        nn.Conv2d(in_channels, resnet.conv2.out_channels, kernel_size=1, stride=1, padding=0)
        if resnet.use_in_shortcut
        else None
    )


# ---------------------------------------------------------------------------------------------- channel selection
def _level_pair(importance: torch.Tensor, dst_width: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Matching ``(dst, src)`` channel indices of one decoder level, chunk by chunk: the ``g``-th of ``groups`` equal
    chunks of the new width is filled from the ``g``-th chunk of the source (``groups`` is the gcd of the two
    GroupNorm group counts, so with equal counts a chunk is a GroupNorm group). Narrower: keep, in each source group, the
    ``dst_width / groups`` channels of largest importance (in their original order). Wider: each source group is
    copied into the first positions of its new group; the remaining channels keep their fresh initialisation.
    """
    src_width = importance.numel()
    src_size, dst_size = src_width // groups, dst_width // groups
    dst, src = [], []
    for g in range(groups):
        if dst_size <= src_size:
            top = importance[g * src_size : (g + 1) * src_size].topk(dst_size).indices.sort().values
            src.append(g * src_size + top)
            dst.append(g * dst_size + torch.arange(dst_size))
        else:
            src.append(g * src_size + torch.arange(src_size))
            dst.append(g * dst_size + torch.arange(src_size))
    return torch.cat(dst), torch.cat(src)


def _chunked(pair, dst_width: int, src_width: int, chunks: int):
    dst, src = pair
    return (
        torch.cat([dst + c * dst_width for c in range(chunks)]),
        torch.cat([src + c * src_width for c in range(chunks)]),
    )


@torch.no_grad()
def copy_decoder_weights(src: StageDecoder, dst: StageDecoder, groups: int) -> None:
    r"""
    Initialise ``dst`` from ``src`` (same block structure, other widths) by structured channel selection.

    The mid block (when the decoders include it) keeps the encoder's width and is copied as is. Every level ``i`` of
    the decoder (up block ``i`` and, for the last level, the output head) has one set of
    channels, shared by everything that writes its residual stream. Their importance is the L1 norm of the incoming
    weights of the resnets' last convolutions, :math:`\sum_r \|W^{(r)}_{\text{conv2}}[c]\|_1`, and the kept channels
    are chosen chunk by chunk (see `_level_pair`, ``groups`` = gcd of the source's and the decoder's GroupNorm group
    counts) so that GroupNorm statistics are taken over channels of one source group where the counts allow. Internal widths that are a multiple ``m`` of the level width (attention inner dims, feed-forward and
    GEGLU projections, scale-shift time projections) take the same selection in each of their ``m`` chunks. A
    resnet input is the concatenation ``[hidden, skip]``: the hidden part follows the previous level's selection
    and the encoder's skip channels are all kept.
    """
    src_pairs, src_widths, dst_widths = [], [], []
    for block_src, block_dst in zip(src.up_blocks, dst.up_blocks):
        importance = sum(resnet.conv2.weight.abs().sum(dim=(1, 2, 3)) for resnet in block_src.resnets)
        width = block_dst.resnets[-1].out_channels
        src_pairs.append(_level_pair(importance.float().cpu(), width, groups))
        src_widths.append(block_src.resnets[-1].out_channels)
        dst_widths.append(width)
    src_params = dict(src.named_parameters())
    last = len(src.up_blocks) - 1
    for name, p_dst in dst.named_parameters():
        p_src = src_params[name]
        if name.startswith("mid_block."):
            p_dst.copy_(p_src)
            continue
        match = re.match(r"up_blocks\.(\d+)\.", name)
        level = int(match.group(1)) if match else last
        resnet = re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|conv_shortcut)\.", name)
        index = []
        for dim in range(min(p_dst.ndim, 2)):
            n_dst, n_src = p_dst.shape[dim], p_src.shape[dim]
            if n_dst == n_src and (dim == 0 or resnet is None or dst_widths[level] == src_widths[level]):
                index.append((torch.arange(n_dst), torch.arange(n_src)))
            elif resnet is not None and (dim == 1 or resnet.group(3) == "norm1"):
                index.append(
                    _concat_pair(int(resnet.group(2)), level, n_dst, n_src, src_pairs, src_widths, dst_widths)
                )
            elif n_dst % dst_widths[level] == 0 and n_dst // dst_widths[level] == n_src // src_widths[level]:
                chunks = n_dst // dst_widths[level]
                index.append(_chunked(src_pairs[level], dst_widths[level], src_widths[level], chunks))
            else:
                raise ValueError(f"cannot map parameter `{name}` {tuple(p_src.shape)} -> {tuple(p_dst.shape)}.")
        sub = p_src
        for dim, (_, src_idx) in enumerate(index):
            sub = sub.index_select(dim, src_idx.to(sub.device))
        if len(index) == 1:
            p_dst[index[0][0]] = sub.to(p_dst.dtype)
        else:
            p_dst[index[0][0][:, None], index[1][0][None, :]] = sub.to(p_dst.dtype)


def _concat_pair(resnet_index, level, n_dst, n_src, pairs, src_widths, dst_widths):
    """Indices of a resnet input ``[hidden, skip]``: hidden from the previous level (or this one), skip all kept."""
    if resnet_index == 0 and level == 0:  # reads the encoder's mid block: the same channels on both sides
        return torch.arange(n_dst), torch.arange(n_src)
    prev = level if resnet_index > 0 else level - 1
    w_dst, w_src = dst_widths[prev], src_widths[prev]
    hidden_dst, hidden_src = pairs[prev]
    skip = n_src - w_src
    return (
        torch.cat([hidden_dst, w_dst + torch.arange(skip)]),
        torch.cat([hidden_src, w_src + torch.arange(skip)]),
    )


# ---------------------------------------------------------------------------------------------- the shared model part
def take(x, index: torch.Tensor | None, batch_size: int):
    """The rows ``index`` of every batch-first tensor in ``x`` (a tensor, ``None``, or a tuple / list of them)."""
    if index is None or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(take(v, index, batch_size) for v in x)
    if torch.is_tensor(x) and x.ndim > 0 and x.shape[0] == batch_size:
        return x.index_select(0, index.to(x.device))
    return x


class MultiDecoderMixin(DecoderLoraLoaderMixin, StageRoutingMixin):
    """
    Behaviour shared by `MultiDecoderUNet2DModel` and `MultiDecoderUNet2DConditionModel`: building the shared encoder
    and the per-stage decoders from a stock diffusers UNet class, routing samples to decoders by timestep, the stock
    UNet's model-level switches (gradient checkpointing, attention slicing and processors, `_no_split_modules`), and
    `from_unet`. A model class sets ``_unet_class`` (the diffusers UNet it mirrors) and ``_encoder_modules``.
    """

    _unet_class: type
    _encoder_modules: tuple[str, ...]
    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    # the stock implementations walk the module tree, so they reach the attention layers of every decoder
    set_attention_slice = UNet2DConditionModel.set_attention_slice
    set_default_attn_processor = UNet2DConditionModel.set_default_attn_processor

    # ------------------------------------------------------------------ construction
    def _build(self, unet_kwargs: dict) -> None:
        config = self.config
        boundaries = list(config.stage_boundaries)
        if any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in boundaries) or any(
            b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])
        ):
            raise ValueError(f"`stage_boundaries` must be strictly increasing numbers, got {boundaries!r}.")
        groups = unet_kwargs.get("norm_num_groups")
        if not isinstance(groups, int):
            raise ValueError(f"`norm_num_groups` must be an int for a multi-decoder UNet, got {groups!r}.")
        encoder_widths = list(unet_kwargs["block_out_channels"])
        decoder_groups = self._check_decoder_groups(config.decoder_norm_num_groups, groups)
        widths = self._check_decoder_widths(config.decoder_block_out_channels, encoder_widths, decoder_groups)

        base = self._unet_class(**unet_kwargs)
        unknown = set(base._modules) - set(self._encoder_modules) - set(DECODER_MODULES)
        if unknown:
            raise ValueError(f"This UNet configuration adds modules a multi-decoder UNet does not support: {unknown}.")
        for name in self._encoder_modules:
            setattr(self, name, getattr(base, name, None))
        mids = self._decoder_mid_blocks(base.mid_block)
        time_embed_dim = base.time_embedding.linear_1.out_features
        skip_channels = encoder_skip_channels(base.conv_in, base.down_blocks)
        decoders, base_used = [], False
        for k, (w, g) in enumerate(zip(widths, decoder_groups)):
            if w == encoder_widths and g == groups and not base_used:
                donor, base_used = base, True
            else:
                donor = self._unet_class(
                    **{
                        **unet_kwargs,
                        "block_out_channels": tuple(w),
                        "norm_num_groups": g,
                        "time_embedding_dim": time_embed_dim,
                        "mid_block_type": None,
                    }
                )
            decoder = StageDecoder(donor.up_blocks, donor.conv_norm_out, donor.conv_act, donor.conv_out, mids[k])
            fit_decoder_to_encoder(decoder, skip_channels, mid_channels=encoder_widths[-1], stage=k)
            decoders.append(decoder)
        self.decoders = nn.ModuleList(decoders)

    def _decoder_mid_blocks(self, mid_block: nn.Module | None) -> list[nn.Module | None]:
        """
        One mid block per decoder when ``decoder_includes_mid_block`` (the stock one for stage 0, freshly
        initialised copies for the others; the encoder then has none), else ``None`` for every decoder.
        """
        if not self.config.decoder_includes_mid_block:
            return [None] * self.num_stages
        if mid_block is None:
            raise ValueError("`decoder_includes_mid_block=True` needs a mid block, but `mid_block_type` is None.")
        self.mid_block = None
        mids = [mid_block]
        for _ in range(1, self.num_stages):
            fresh = copy.deepcopy(mid_block)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            mids.append(fresh)
        return mids

    def _check_decoder_groups(self, decoder_groups, groups: int) -> list[int]:
        if decoder_groups is None:
            return [groups] * self.num_stages
        decoder_groups = list(decoder_groups)
        if len(decoder_groups) != self.num_stages or any(
            isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in decoder_groups
        ):
            raise ValueError(
                f"`decoder_norm_num_groups` must hold one positive int per stage ({self.num_stages} stages from "
                f"`stage_boundaries`), got {decoder_groups!r}."
            )
        return decoder_groups

    def _check_decoder_widths(self, widths, encoder_widths: list[int], decoder_groups: list[int]) -> list[list[int]]:
        if widths is None:
            widths = [list(encoder_widths) for _ in range(self.num_stages)]
        widths = [list(w) for w in widths]
        if len(widths) != self.num_stages:
            raise ValueError(
                f"`decoder_block_out_channels` must hold one list of widths per stage ({self.num_stages} stages from "
                f"`stage_boundaries`), got {len(widths)}."
            )
        for k, w in enumerate(widths):
            if len(w) != len(encoder_widths) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in w):
                raise ValueError(
                    f"`decoder_block_out_channels[{k}]` must be {len(encoder_widths)} positive ints (one per level of "
                    f"`block_out_channels` {encoder_widths}), got {w}."
                )
            for level, c in enumerate(w):
                divisor = math.lcm(decoder_groups[k], self._attention_divisor(level) or 1)
                if c % divisor:
                    raise ValueError(
                        f"`decoder_block_out_channels[{k}][{level}]` = {c} cannot fit: decoder widths must be "
                        f"multiples of {divisor} (the decoder's {decoder_groups[k]} GroupNorm groups, "
                        "`decoder_norm_num_groups` or `norm_num_groups`, and the attention heads at that level)."
                    )
        return widths

    def _attention_divisor(self, level: int) -> int | None:
        """What the width of a decoder level must be divisible by for its attention layers (None: no constraint)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ stages
    def _check_timestep(self, timestep, batch_size: int) -> None:
        shape = tuple(timestep.shape) if torch.is_tensor(timestep) else ()
        numel = math.prod(shape)
        if len(shape) > 1 or numel not in (1, batch_size):
            raise ValueError(
                f"`timestep` must be a scalar or a 1-D tensor with 1 or batch_size ({batch_size}) entries, "
                f"got shape {shape}."
            )

    def _route(self, timestep, stage: int | None, decode) -> torch.Tensor:
        r"""
        Run ``decode(k, index)`` for every stage ``k`` used by the batch and reassemble the outputs in order.
        ``index`` is ``None`` when the whole batch is in one stage (no gather / scatter), else the sample indices.

        The stage is found without a host read when it can be: ``stage`` given (trusted, nothing computed), or one
        timestep tensor for the batch under `torch.compile` (in-graph `select_stage`). Otherwise the timesteps are
        read on the host (`host_stage_indices`); under `torch.compile` that is a graph break, so compiled training on
        mixed-stage batches should pass ``stage`` per single-stage batch instead.
        """
        if stage is not None:
            return decode(self.check_stage(stage), None)
        if torch.is_tensor(timestep) and timestep.numel() == 1 and torch.compiler.is_compiling():
            return self.select_stage(timestep, lambda k: decode(k, None))
        stages = self.host_stage_indices(timestep)
        used = sorted(set(stages))
        if len(used) == 1:
            return decode(used[0], None)
        outputs, order = [], []
        device = timestep.device
        for k in used:
            index = torch.tensor([i for i, s in enumerate(stages) if s == k], device=device)
            outputs.append(decode(k, index))
            order.append(index)
        inverse = torch.argsort(torch.cat(order).to(outputs[0].device))
        return torch.cat(outputs)[inverse]

    # ------------------------------------------------------------------ adapters
    def lora_target_modules(
        self, part: Union[Literal["encoder", "all"], int] = "all", layers: tuple[str, ...] = DEFAULT_LORA_LAYERS
    ) -> str:
        r"""
        A regex for PEFT's ``target_modules`` (matched against full module names) selecting ``layers`` in one part.

        Args:
            part (`"encoder"`, `"all"` or `int`):
                ``"encoder"``: the shared encoder (every module outside ``decoders.*``); an int ``k``: the decoder of
                stage ``k`` (``decoders.k.*``); ``"all"``: both.
            layers (`tuple[str, ...]`):
                Module-name suffixes to adapt, by default the attention projections ``to_q``, ``to_k``, ``to_v``,
                ``to_out.0``.
        """
        suffix = "(" + "|".join(re.escape(layer) for layer in layers) + ")"
        if part == "all":
            return rf".*\.{suffix}"
        if part == "encoder":
            return rf"(?!decoders\.).*\.{suffix}"
        if isinstance(part, int) and not isinstance(part, bool) and 0 <= part < self.num_stages:
            return rf"decoders\.{part}\..*\.{suffix}"
        raise ValueError(f"`part` must be 'encoder', 'all' or a stage in [0, {self.num_stages}), got {part!r}.")

    # ------------------------------------------------------------------ from a pretrained UNet
    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        stages: Union[TimestepStages, list[float]],
        decoder_block_out_channels: list[list[int]] | None = None,
        decoder_norm_num_groups: list[int] | None = None,
        decoder_includes_mid_block: bool = False,
    ):
        r"""
        Build a multi-decoder model from a pretrained diffusers UNet of the mirrored class.

        The encoder is copied. A decoder with the source's widths (and GroupNorm groups) is an exact copy of the
        source decoder (so at every timestep the new model computes exactly what the source computes); a decoder
        with other widths is initialised by structured channel selection (`copy_decoder_weights`). With
        ``decoder_includes_mid_block`` the source's mid block is copied into every decoder.

        Args:
            unet: the source `UNet2DModel` / `UNet2DConditionModel`.
            stages (`TimestepStages` or `list[float]`):
                The stages, or the ``K - 1`` interior boundaries in the units of the model's ``timestep`` argument.
            decoder_block_out_channels (`list[list[int]]`, *optional*):
                Per-stage decoder widths (one list per stage, in the encoder's order); ``None`` keeps the source's.
            decoder_norm_num_groups (`list[int]`, *optional*):
                Per-stage GroupNorm groups of the decoders; ``None`` keeps the source's ``norm_num_groups``.
            decoder_includes_mid_block (`bool`, defaults to `False`):
                Give every decoder its own copy of the mid block (the multi-stage authors' EDM variant).
        """
        if not isinstance(unet, cls._unet_class):
            raise ValueError(f"`unet` must be a {cls._unet_class.__name__}, got {type(unet).__name__}.")
        if isinstance(stages, TimestepStages):
            boundaries, num_train_timesteps = list(stages.boundaries), stages.num_train_timesteps
        else:
            boundaries = list(stages)
            num_train_timesteps = unet.config.get("num_train_timesteps") or 1000
        config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "num_train_timesteps"}
        model = cls(
            **config,
            stage_boundaries=boundaries,
            num_train_timesteps=num_train_timesteps,
            decoder_block_out_channels=decoder_block_out_channels,
            decoder_norm_num_groups=decoder_norm_num_groups,
            decoder_includes_mid_block=decoder_includes_mid_block,
        )
        in_decoder = DECODER_MODULES + (("mid_block",) if decoder_includes_mid_block else ())
        encoder_state = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] not in in_decoder}
        result = model.load_state_dict(encoder_state, strict=False)
        if result.unexpected_keys or any(not k.startswith("decoders.") for k in result.missing_keys):
            raise ValueError(f"`unet` does not match its own config: {result}.")
        mid = unet.mid_block if decoder_includes_mid_block else None
        source = StageDecoder(unet.up_blocks, unet.conv_norm_out, unet.conv_act, unet.conv_out, mid)
        groups = unet.config.norm_num_groups
        for decoder, decoder_groups in zip(
            model.decoders, model._check_decoder_groups(decoder_norm_num_groups, groups)
        ):
            if decoder.block_out_channels == source.block_out_channels and decoder_groups == groups:
                decoder.load_state_dict(source.state_dict())
            else:
                copy_decoder_weights(source, decoder, groups=math.gcd(groups, decoder_groups))
        model.to(unet.device)
        return model if unet.dtype == model.dtype else model.to(dtype=unet.dtype)

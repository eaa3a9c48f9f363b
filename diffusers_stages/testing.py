"""Offline test kit: tiny, real diffusers / transformers components built from configs (no Hub access).

Every builder seeds torch so that the same call returns the same weights.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .utils import bytes_to_unicode


def tiny_unet_2d(
    sample_size: int = 8,
    in_channels: int = 1,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    attention: bool = True,
    seed: int = 0,
) -> UNet2DModel:
    """A small pixel-space `UNet2DModel` (one layer per block, attention at the lowest level)."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def tiny_unet_2d_condition(
    sample_size: int = 32, cross_attention_dim: int = 32, seed: int = 0
) -> UNet2DConditionModel:
    """The tiny Stable Diffusion UNet of DESIGN.md (32/64 channels, cross-attention at the second level)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=cross_attention_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny `AutoencoderKL` with 4 latent channels and a downsampling factor of 2."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """
    A byte-level CLIP tokenizer with no merges: the two special tokens plus the 256 byte characters, each also
    with ``</w>`` (vocabulary of 514). Built in memory; never use ``from_pretrained(<hub id>)`` offline.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    if tok.vocab_size != len(vocab):
        raise RuntimeError(f"tiny CLIP tokenizer is broken: vocab_size {tok.vocab_size} != {len(vocab)}.")
    return tok


def tiny_clip_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A 2-layer CLIP text encoder with hidden size 32."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        max_position_embeddings=77,
    )
    return CLIPTextModel(config).eval()


def tiny_stable_diffusion_pipeline(seed: int = 0, scheduler=None) -> StableDiffusionPipeline:
    """A complete tiny `StableDiffusionPipeline` (no safety checker) that samples 64x64 images in ~0.1 s a step."""
    scheduler = scheduler or DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed),
        tokenizer=tiny_clip_tokenizer(),
        unet=tiny_unet_2d_condition(seed=seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_stable_diffusion_xl_pipeline(seed: int = 0):
    """
    A complete tiny `StableDiffusionXLPipeline`: a ``text_time`` UNet (cross-attention 64 = the two 32-wide text
    encoders concatenated; added embeddings ``6 x 8`` time ids plus the 32-wide pooled projection), the tiny VAE and
    two tiny CLIP text encoders (the second with a projection), sharing the byte-level tokenizer.
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    config = tiny_clip_text_encoder(seed).config
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**config.to_dict(), "projection_dim": 32})).eval()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed),
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
        ),
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_vision_encoder(image_size: int = 32, seed: int = 0):
    """A 2-layer `CLIPVisionModelWithProjection` (hidden size 32, 8x8 patches, 32-wide image embeddings)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )
    return CLIPVisionModelWithProjection(config).eval()


def save_tiny_ip_adapter(unet: UNet2DConditionModel, folder, weight_name: str = "ip_adapter.safetensors") -> None:
    r"""
    Write a random IP-Adapter for ``unet`` into ``folder`` in the layout diffusers' ``load_ip_adapter(folder,
    subfolder="", weight_name=weight_name)`` reads: the weight file with ``image_proj.proj.*`` / ``image_proj.norm.*``
    (the image projection to 4 tokens of the UNet's cross-attention width, from `tiny_clip_vision_encoder`'s 32-wide
    embeddings) and ``ip_adapter.{2i+1}.to_k_ip.weight`` / ``to_v_ip.weight`` for the ``i``-th cross-attention layer
    (shaped like its ``to_k`` / ``to_v``), plus the image encoder in ``folder/image_encoder``.

    Args:
        unet (`UNet2DConditionModel`): The UNet the adapter is for (before ``load_ip_adapter``).
        folder (`str` or `os.PathLike`): Where to write.
        weight_name (`str`, defaults to `"ip_adapter.safetensors"`): The weight file's name.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    encoder = tiny_clip_vision_encoder()
    encoder.save_pretrained(Path(folder) / "image_encoder")
    g = torch.Generator().manual_seed(0)
    width, embed = unet.config.cross_attention_dim, encoder.config.projection_dim
    state = {
        "image_proj.proj.weight": 0.2 * torch.randn(4 * width, embed, generator=g),
        "image_proj.proj.bias": torch.zeros(4 * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    cross_attention = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(cross_attention):
        attention = unet.get_submodule(name)
        for kind in ("k", "v"):
            shape = getattr(attention, f"to_{kind}").weight.shape
            state[f"ip_adapter.{2 * i + 1}.to_{kind}_ip.weight"] = 0.3 * torch.randn(shape, generator=g)
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(state, Path(folder) / weight_name)

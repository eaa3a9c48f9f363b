"""The published multi-stage variants: a mid block per decoder, and narrow decoders with their own GroupNorm groups."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DModel

from diffusers_stages import MultiDecoderUNet2DConditionModel, MultiDecoderUNet2DModel
from diffusers_stages.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d, tiny_unet_2d_condition

BOUNDS = [300, 700]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet_2d().eval()


@pytest.fixture(scope="module")
def mid_model(unet):
    return MultiDecoderUNet2DModel.from_unet(unet, BOUNDS, decoder_includes_mid_block=True).eval()


def test_mid_block_per_decoder_is_exact_at_full_width(unet, mid_model):
    assert mid_model.mid_block is None
    assert all(type(d.mid_block) is type(unet.mid_block) for d in mid_model.decoders)
    assert len({id(d.mid_block) for d in mid_model.decoders}) == 3
    t = torch.tensor([0, 299, 300, 500, 699, 700, 999])
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mid_model(x, t).sample, unet(x, t).sample, rtol=0, atol=1e-5)


def test_fresh_mid_blocks_are_independent_and_gradients_reach_only_the_stage_mid_block(unet):
    model = MultiDecoderUNet2DModel(**unet.config, stage_boundaries=BOUNDS, decoder_includes_mid_block=True)
    w = [d.mid_block.resnets[0].conv1.weight for d in model.decoders]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # each decoder initialised on its own
    model(torch.randn(2, 1, 8, 8), torch.tensor([400, 500])).sample.sum().backward()
    assert [wk.grad is not None for wk in w] == [False, True, False]


def test_narrow_decoders_and_mid_blocks_from_unet_and_round_trip(unet, tmp_path):
    model = MultiDecoderUNet2DModel.from_unet(
        unet, BOUNDS, [[32, 64, 64], [16, 32, 32], [8, 16, 16]], decoder_includes_mid_block=True
    ).eval()
    for decoder in model.decoders:  # the mid block keeps the encoder's width and is a copy of the source's
        assert torch.equal(decoder.mid_block.attentions[0].to_q.weight, unet.mid_block.attentions[0].to_q.weight)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900])
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["decoder_includes_mid_block"] is True
    reloaded = MultiDecoderUNet2DModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t).sample, model(x, t).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x[:1], t[:1]).sample, unet(x[:1], t[:1]).sample, rtol=0, atol=1e-5)


def test_mid_block_variant_in_ddpm_pipeline_saved_and_reloaded(mid_model, tmp_path):
    pipe = DDPMPipeline(unet=mid_model, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=1, num_inference_steps=2, output_type="np")
    images = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.save_pretrained(tmp_path / "pipe")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.unet.config.decoder_includes_mid_block and reloaded.unet.mid_block is None
    assert abs(reloaded(generator=torch.Generator().manual_seed(0), **kwargs).images - images).max() < 1e-5


def test_mid_block_variant_in_stable_diffusion_pipeline_is_exact():
    unet = tiny_unet_2d_condition().eval()
    model = MultiDecoderUNet2DConditionModel.from_unet(unet, BOUNDS, decoder_includes_mid_block=True).eval()
    parts = tiny_stable_diffusion_pipeline().components
    kwargs = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    images = []
    for u in (unet, model):
        pipe = StableDiffusionPipeline(**{**parts, "unet": u})
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a digit", generator=torch.Generator().manual_seed(0), **kwargs).images)
    assert abs(images[0] - images[1]).max() < 1e-4


def test_paper_cifar_decoders_build_with_their_own_norm_groups():
    """CIFAR-10 in the paper: decoders of 192 / 128 / 16 base channels over a 128-channel encoder (x [1, 2, 2, 2])."""
    config = dict(
        sample_size=8,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    widths = [[c * m for m in (1, 2, 2, 2)] for c in (192, 128, 16)]
    with pytest.raises(ValueError, match=r"decoder_block_out_channels\[2\]\[0\]` = 16 cannot fit"):
        MultiDecoderUNet2DModel(**config, stage_boundaries=BOUNDS, decoder_block_out_channels=widths)
    model = MultiDecoderUNet2DModel(
        **config, stage_boundaries=BOUNDS, decoder_block_out_channels=widths, decoder_norm_num_groups=[32, 32, 4]
    )
    assert [d.conv_norm_out.num_groups for d in model.decoders] == [32, 32, 4]
    assert [d.block_out_channels for d in model.decoders] == widths
    with torch.no_grad():
        out = model(torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 900])).sample
    assert out.shape == (3, 3, 8, 8) and torch.isfinite(out).all()


def test_from_unet_with_decoder_norm_groups_selects_channels_per_common_group(unet):
    model = MultiDecoderUNet2DModel.from_unet(
        unet, BOUNDS, [[32, 64, 64], [32, 64, 64], [8, 16, 16]], decoder_norm_num_groups=[8, 4, 2]
    )
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([100])
    with torch.no_grad():  # stage 0 keeps the source's widths and groups: exact
        torch.testing.assert_close(model(x, t).sample, unet(x, t).sample, rtol=0, atol=1e-5)
    # same widths, fewer groups: the weights are copied unchanged
    assert torch.equal(model.decoders[1].conv_out.weight, unet.conv_out.weight)
    # 32 -> 8 channels with 2 groups: selection in gcd(8, 2) = 2 chunks of the source, 4 channels from each
    importance = sum(r.conv2.weight.abs().sum(dim=(1, 2, 3)) for r in unet.up_blocks[-1].resnets)
    chunks = importance.reshape(2, -1)
    keep = torch.cat([g * 16 + chunks[g].topk(4).indices.sort().values for g in range(2)])
    assert torch.equal(model.decoders[2].conv_out.weight, unet.conv_out.weight[:, keep])


def test_bad_variant_arguments_raise_clear_errors(unet):
    config = dict(unet.config)
    with pytest.raises(ValueError, match="`decoder_norm_num_groups` must hold one positive int per stage"):
        MultiDecoderUNet2DModel(**config, stage_boundaries=BOUNDS, decoder_norm_num_groups=[8, 4])
    with pytest.raises(ValueError, match="needs a mid block"):
        MultiDecoderUNet2DModel(
            **{**config, "mid_block_type": None}, stage_boundaries=BOUNDS, decoder_includes_mid_block=True
        )
    with pytest.raises(ValueError, match=r"decoder_norm_num_groups\[1\]"):  # 16 decoder + 32 skip channels, 16 groups
        MultiDecoderUNet2DModel(
            **{**config, "block_out_channels": (24, 48, 48), "norm_num_groups": 8},
            stage_boundaries=[500],
            decoder_block_out_channels=[[24, 48, 48], [16, 32, 32]],
            decoder_norm_num_groups=[8, 16],
        )
    assert isinstance(unet, UNet2DModel)

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

from diffusers_stages import MultiDecoderUNet2DModel, TimestepStages
from diffusers_stages.testing import tiny_unet_2d

BOUNDS = [333, 667]
TAILORED = [[48, 96, 96], [32, 64, 64], [8, 16, 16]]  # the paper's 192 / 128 / 16 over a 128 encoder, scaled


@pytest.fixture(scope="module")
def unet():
    return tiny_unet_2d().eval()


@pytest.fixture(scope="module")
def tailored(unet):
    return MultiDecoderUNet2DModel.from_unet(unet, BOUNDS, decoder_block_out_channels=TAILORED).eval()


def test_full_width_from_unet_is_exact_for_every_timestep(unet):
    model = MultiDecoderUNet2DModel.from_unet(unet, TimestepStages(BOUNDS)).eval()
    t = torch.cat([torch.arange(0, 1000, 25), torch.tensor([332, 333, 334, 666, 667, 668, 999])])
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, unet(x, t).sample, atol=1e-5, rtol=0)
        for scalar in [0, 332, 333, 666, 667, 999]:
            assert torch.equal(model(x[:4], scalar).sample, unet(x[:4], scalar).sample)


def test_stage_index_is_bucketize_right_and_accepts_floats():
    model = MultiDecoderUNet2DModel(
        **tiny_unet_2d().config, stage_boundaries=[0.5, 1.75], decoder_block_out_channels=None
    )
    t = torch.tensor([0.0, 0.4999, 0.5, 1.0, 1.75, 80.0])
    reference = torch.tensor([sum(b <= float(v) for b in [0.5, 1.75]) for v in t])
    assert torch.equal(model.stage_index(t), reference)
    assert model.num_stages == 3 and model.stages is None
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        out = model(x, t).sample
        torch.testing.assert_close(out[2:3], model(x[2:3], torch.tensor([0.5])).sample, atol=1e-5, rtol=0)


def test_stages_property_returns_timestep_stages(tailored):
    assert tailored.stages == TimestepStages(BOUNDS)
    assert tailored.num_stages == 3


def test_mixed_batch_equals_each_sample_alone(tailored):
    t = torch.tensor([900, 10, 500, 20, 999, 400])
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = tailored(x, t).sample
        for i in range(len(t)):
            torch.testing.assert_close(batched[i : i + 1], tailored(x[i : i + 1], t[i]).sample, atol=1e-5, rtol=0)
    # the decoders really differ: a sample decoded by another stage gives another output
    assert not torch.allclose(tailored(x[:1], 10).sample, tailored(x[:1], 500).sample, atol=1e-3)


def test_only_used_decoders_run_once_on_their_sub_batch(tailored):
    calls = []
    hooks = [
        d.conv_out.register_forward_hook(lambda m, i, o, k=k: calls.append((k, i[0].shape[0])))
        for k, d in enumerate(tailored.decoders)
    ]
    try:
        with torch.no_grad():
            tailored(torch.randn(5, 1, 8, 8), torch.tensor([900, 10, 950, 5, 990]))
            tailored(torch.randn(3, 1, 8, 8), torch.tensor([500]))
    finally:
        for h in hooks:
            h.remove()
    assert calls == [(0, 2), (2, 3), (1, 3)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_gradients_reach_encoder_and_only_the_stage_decoder(tailored, stage):
    model = MultiDecoderUNet2DModel.from_config(tailored.config)
    model.load_state_dict(tailored.state_dict())
    t = TimestepStages(BOUNDS).sample_timesteps(stage, batch_size=4, generator=torch.Generator().manual_seed(0))
    model(torch.randn(4, 1, 8, 8), t).sample.square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("decoders."):
            own = name.startswith(f"decoders.{stage}.")
            assert (p.grad is not None) == own, name
            if own and "conv_out.weight" in name:
                assert p.grad.abs().sum() > 0
        elif name.startswith(("conv_in", "down_blocks", "time_embedding")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _level_indices(importance, width, groups):
    """Reference: in each GroupNorm group keep the `width / groups` largest channels, in order."""
    size, keep = len(importance) // groups, width // groups
    idx = []
    for g in range(groups):
        chunk = importance[g * size : (g + 1) * size]
        idx += sorted(g * size + int(i) for i in torch.argsort(chunk, descending=True)[:keep])
    return torch.tensor(idx)


def test_narrow_decoder_is_a_structured_channel_selection(unet, tailored):
    src_block, groups = unet.up_blocks[-1], unet.config.norm_num_groups
    importance = sum(r.conv2.weight.abs().sum(dim=(1, 2, 3)) for r in src_block.resnets)
    for k in (1, 2):
        dec = tailored.decoders[k]
        idx = _level_indices(importance, TAILORED[k][0], groups)
        assert torch.equal(dec.conv_out.weight, unet.conv_out.weight[:, idx])
        assert torch.equal(dec.conv_norm_out.weight, unet.conv_norm_out.weight[idx])
        conv1 = dec.up_blocks[-1].resnets[-1].conv1.weight  # input = [hidden (selected), skip (all 32 kept)]
        src_conv1 = src_block.resnets[-1].conv1.weight
        assert torch.equal(conv1[:, TAILORED[k][0] :], src_conv1[idx][:, 32:])
        assert torch.equal(conv1[:, : TAILORED[k][0]], src_conv1[idx][:, idx])


def test_wider_decoder_keeps_the_source_channels_group_by_group(unet, tailored):
    dec, groups = tailored.decoders[0], unet.config.norm_num_groups
    src_size, dst_size = 32 // groups, 48 // groups
    positions = torch.cat([g * dst_size + torch.arange(src_size) for g in range(groups)])
    assert torch.equal(dec.conv_norm_out.bias[positions], unet.conv_norm_out.bias)
    assert torch.equal(dec.conv_out.weight[:, positions], unet.conv_out.weight)


def test_save_load_round_trip(tailored, tmp_path):
    tailored.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["stage_boundaries"] == BOUNDS and config["decoder_block_out_channels"] == TAILORED
    reloaded = MultiDecoderUNet2DModel.from_pretrained(tmp_path / "model").eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 990])
    with torch.no_grad():
        # same weights; conv kernels may pick another summation order run to run on some CPUs
        torch.testing.assert_close(reloaded(x, t).sample, tailored(x, t).sample, rtol=0, atol=1e-5)


def test_inside_ddpm_pipeline_saved_and_reloaded(tailored, tmp_path):
    pipe = DDPMPipeline(unet=tailored, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"][1] == "MultiDecoderUNet2DModel"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.unet, MultiDecoderUNet2DModel)
    again = reloaded(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert abs(images.images - again.images).max() < 1e-5


def test_bad_input_raises_clear_errors(unet, tailored):
    config = dict(unet.config)
    with pytest.raises(ValueError, match="decoder_block_out_channels.*3 stages"):
        MultiDecoderUNet2DModel(**config, stage_boundaries=BOUNDS, decoder_block_out_channels=TAILORED[:2])
    with pytest.raises(ValueError, match=r"decoder_block_out_channels\[1\]\[0\]` = 12 cannot fit"):
        MultiDecoderUNet2DModel(
            **config, stage_boundaries=BOUNDS, decoder_block_out_channels=[[32, 64, 64], [12, 64, 64], [8, 16, 16]]
        )
    with pytest.raises(ValueError, match=r"decoder_block_out_channels\[0\]` must be 3 positive ints"):
        MultiDecoderUNet2DModel(**config, stage_boundaries=[500], decoder_block_out_channels=[[32, 64], [32, 64, 64]])
    with pytest.raises(
        ValueError, match="attention heads"
    ):  # attention level: multiple of attention_head_dim 8 and 8 groups
        MultiDecoderUNet2DModel(
            **{**config, "attention_head_dim": 16},
            stage_boundaries=[500],
            decoder_block_out_channels=[[32, 64, 64], [32, 64, 8]],
        )
    with pytest.raises(ValueError, match="stage_boundaries"):
        MultiDecoderUNet2DModel(**config, stage_boundaries=[600, 300])
    with pytest.raises(ValueError, match="timestep"):
        tailored(torch.randn(3, 1, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timestep"):
        tailored(torch.randn(2, 1, 8, 8), torch.ones(2, 1))
    with pytest.raises(ValueError, match="UNet2DModel"):
        MultiDecoderUNet2DModel.from_unet(torch.nn.Linear(2, 2), BOUNDS)
    with pytest.raises(ValueError, match="part"):
        tailored.lora_target_modules(3)

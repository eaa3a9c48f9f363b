import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from peft import LoraConfig

from diffusers_stages import MultiDecoderUNet2DConditionModel, TimestepStages
from diffusers_stages.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d_condition

BOUNDS = [300, 700]
TAILORED = [[64, 96], [32, 64], [32, 32]]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet_2d_condition().eval()


@pytest.fixture(scope="module")
def tailored(unet):
    return MultiDecoderUNet2DConditionModel.from_unet(unet, BOUNDS, decoder_block_out_channels=TAILORED).eval()


def _inputs(batch, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 7, 32, generator=g)


def test_full_width_from_unet_is_exact_for_every_timestep(unet):
    model = MultiDecoderUNet2DConditionModel.from_unet(unet, TimestepStages(BOUNDS)).eval()
    t = torch.cat([torch.arange(0, 1000, 50), torch.tensor([299, 300, 699, 700, 999])])
    x, ctx = _inputs(len(t), size=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx).sample, unet(x, t, ctx).sample, atol=1e-5, rtol=0)
        for scalar in [0, 300, 999]:
            assert torch.equal(model(x[:2], scalar, ctx[:2]).sample, unet(x[:2], scalar, ctx[:2]).sample)
        odd, ctx3 = _inputs(3, size=7)  # a size that is not a multiple of the upsampling factor
        t3 = torch.tensor([5, 400, 800])
        torch.testing.assert_close(model(odd, t3, ctx3).sample, unet(odd, t3, ctx3).sample, atol=1e-5, rtol=0)


def test_mixed_batch_equals_each_sample_alone_with_masks(tailored):
    t = torch.tensor([900, 10, 500, 950])
    x, ctx = _inputs(len(t), seed=1, size=8)
    mask = torch.ones(len(t), 7)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    with torch.no_grad():
        batched = tailored(x, t, ctx, encoder_attention_mask=mask).sample
        for i in range(len(t)):
            alone = tailored(x[i : i + 1], t[i], ctx[i : i + 1], encoder_attention_mask=mask[i : i + 1]).sample
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)


def test_gradients_reach_encoder_and_only_the_stage_decoder(tailored):
    model = MultiDecoderUNet2DConditionModel.from_config(tailored.config)
    model.load_state_dict(tailored.state_dict())
    x, ctx = _inputs(2, size=8)
    model(x, torch.tensor([710, 999]), ctx).sample.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith(("decoders.0.", "decoders.1.")))
    assert all(g is not None for n, g in grads.items() if n.startswith("decoders.2."))
    assert grads["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"].abs().sum() > 0


def _randomise_lora_b(model):
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


def test_lora_target_patterns_select_encoder_one_decoder_or_all(unet):
    model = MultiDecoderUNet2DConditionModel.from_unet(unet, BOUNDS).eval()
    model.add_adapter(LoraConfig(r=4, target_modules=model.lora_target_modules(1)), adapter_name="dec1")
    model.add_adapter(LoraConfig(r=4, target_modules=model.lora_target_modules("encoder")), adapter_name="enc")
    model.add_adapter(LoraConfig(r=4, target_modules=model.lora_target_modules("all")), adapter_name="every")
    where = {}
    for name, _ in model.named_parameters():
        if "lora_A" in name:
            adapter = name.split("lora_A.")[1].split(".")[0]
            where.setdefault(adapter, set()).add(
                "decoders." + name.split(".")[1] if name.startswith("decoders.") else "encoder"
            )
    assert where == {
        "dec1": {"decoders.1"},
        "enc": {"encoder"},
        "every": {"encoder", "decoders.0", "decoders.1", "decoders.2"},
    }
    _randomise_lora_b(model)
    x, ctx = _inputs(2, size=8)
    with torch.no_grad():
        model.disable_adapters()
        base = [model(x, t, ctx).sample for t in (100, 500)]
        model.enable_adapters()
        model.set_adapters("dec1")
        adapted = [model(x, t, ctx).sample for t in (100, 500)]
    assert torch.equal(adapted[0], base[0])  # stage 0 does not use decoder 1
    assert not torch.allclose(adapted[1], base[1], atol=1e-4)


def test_stable_diffusion_pipeline_save_and_reload(tailored, tmp_path):
    pipe = tiny_stable_diffusion_pipeline()
    pipe = StableDiffusionPipeline(**{**pipe.components, "unet": tailored})
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    images = pipe("a digit", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["unet"][1] == tailored.__class__.__name__
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.unet, MultiDecoderUNet2DConditionModel)
    assert reloaded.unet.config.decoder_block_out_channels == TAILORED
    again = reloaded("a digit", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(images - again).max() < 1e-5


def test_bad_input_raises_clear_errors(unet, tailored):
    config = dict(unet.config)
    with pytest.raises(ValueError, match="3 stages"):
        MultiDecoderUNet2DConditionModel(**config, stage_boundaries=BOUNDS, decoder_block_out_channels=TAILORED[:1])
    with pytest.raises(ValueError, match=r"\[1\]\[1\]` = 48 cannot fit"):  # 32 GroupNorm groups
        MultiDecoderUNet2DConditionModel(
            **config, stage_boundaries=[500], decoder_block_out_channels=[[32, 64], [32, 48]]
        )
    with pytest.raises(ValueError, match="timestep"):
        x, ctx = _inputs(2, size=8)
        tailored(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        MultiDecoderUNet2DConditionModel.from_unet(torch.nn.Linear(2, 2), BOUNDS)

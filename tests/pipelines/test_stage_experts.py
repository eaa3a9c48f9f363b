"""`StageExpertsUNet`: per-sample routing, stock pipelines, save / load, and the family / count checks."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline

from diffusers_stages import StageExpertsUNet, TimestepStages
from diffusers_stages.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d, tiny_unet_2d_condition

STAGES = TimestepStages([300, 700])


@pytest.fixture(scope="module")
def experts():
    # different configs per stage (a pruned-like narrow expert for the noisiest stage)
    return [
        tiny_unet_2d(seed=0).eval(),
        tiny_unet_2d(seed=1).eval(),
        tiny_unet_2d(block_out_channels=(16, 32, 32), seed=2).eval(),
    ]


@pytest.fixture(scope="module")
def model(experts):
    return StageExpertsUNet.from_experts(experts, STAGES).eval()


def reference(experts, x, t):
    """The oracle: each sample through the expert of its stage, #{b <= t}."""
    rows = [experts[sum(b <= int(ti) for b in STAGES.boundaries)](x[i : i + 1], ti).sample for i, ti in enumerate(t)]
    return torch.cat(rows)


def test_mixed_batch_routes_each_sample_to_its_expert(experts, model):
    t = torch.tensor([999, 0, 299, 300, 699, 700, 450, 10])
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, t).sample
        torch.testing.assert_close(out, reference(experts, x, t), atol=1e-5, rtol=0)
        # a scalar timestep runs one expert on the whole batch, bit-exactly
        assert torch.equal(model(x, 450).sample, experts[1](x, 450).sample)
        assert torch.equal(model(x, torch.tensor([999]), return_dict=False)[0], experts[2](x, 999).sample)
    # the experts really differ, so routing is observable
    assert not torch.allclose(experts[0](x, 450).sample, experts[1](x, 450).sample)


def test_only_used_experts_run(experts, model):
    calls = []
    handles = [e.register_forward_hook(lambda m, a, o, k=k: calls.append(k)) for k, e in enumerate(model.experts)]
    try:
        with torch.no_grad():
            model(torch.randn(3, 1, 8, 8), torch.tensor([10, 900, 20]))
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == [0, 2]


def test_config_and_stages(model, experts):
    assert model.num_stages == 3 and model.stages == STAGES and isinstance(model.experts, torch.nn.ModuleList)
    assert model.config.sample_size == 8 and model.config.in_channels == 1 and model.config.cross_attention_dim is None
    assert model.experts[2].config.block_out_channels == (16, 32, 32)
    assert torch.equal(model.stage_index(torch.tensor([0, 299, 300, 700, 999])), torch.tensor([0, 0, 1, 2, 2]))


def test_ddpm_pipeline_save_load_round_trip(model, tmp_path):
    pipe = DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    before = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers_stages.models.stage_experts", "StageExpertsUNet"]
    assert list((tmp_path / "unet").glob("*.safetensors")) and not list((tmp_path / "unet").glob("*.bin"))
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, StageExpertsUNet) and list(loaded.unet.experts[2].config.block_out_channels) == [
        16,
        32,
        32,
    ]
    after = loaded(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert (before.images == after.images).all()


def test_inside_stock_stable_diffusion_pipeline_equals_plain_with_identical_experts():
    pipe = tiny_stable_diffusion_pipeline()
    kwargs = dict(prompt=["a red square", "a cat"], num_inference_steps=3, output_type="np", guidance_scale=3.0)
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    unet = tiny_unet_2d_condition()
    experts = StageExpertsUNet.from_experts([unet, unet], TimestepStages([500]))
    staged = StableDiffusionPipeline(**{**pipe.components, "unet": experts})
    staged.set_progress_bar_config(disable=True)
    out = staged(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == plain.shape and (out == plain).all()


def test_mixed_batch_with_conditioning_is_split_too():
    experts = [tiny_unet_2d_condition(seed=s).eval() for s in (0, 1)]
    model = StageExpertsUNet.from_experts(experts, [500]).eval()
    x, cond = torch.randn(3, 4, 32, 32), torch.randn(3, 5, 32)
    t = torch.tensor([800, 100, 900])
    with torch.no_grad():
        out = model(x, t, encoder_hidden_states=cond).sample
        for i, k in enumerate([1, 0, 1]):
            ref = experts[k](x[i : i + 1], t[i], encoder_hidden_states=cond[i : i + 1]).sample
            torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)


def test_bad_input_is_rejected():
    pixel = tiny_unet_2d()
    with pytest.raises(ValueError, match="one expert per stage"):
        StageExpertsUNet.from_experts([pixel, pixel], STAGES)
    with pytest.raises(ValueError, match="architecture family.*UNet2DConditionModel"):
        StageExpertsUNet.from_experts([pixel, tiny_unet_2d_condition()], [500])
    with pytest.raises(ValueError, match="in_channels 3 != 1"):
        StageExpertsUNet.from_experts([pixel, tiny_unet_2d(in_channels=3)], [500])
    with pytest.raises(ValueError, match="sample_size 16 != 8"):
        StageExpertsUNet.from_experts([pixel, tiny_unet_2d(sample_size=16)], [500])
    with pytest.raises(ValueError, match="stage_boundaries"):
        StageExpertsUNet.from_experts([pixel, pixel, pixel], [700, 300])
    with pytest.raises(ValueError, match="expert_class_names"):
        StageExpertsUNet(stage_boundaries=[], expert_class_names=["Linear"], expert_configs=[{}])
    with pytest.raises(ValueError, match="timestep"):
        StageExpertsUNet.from_experts([pixel, pixel], [500])(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))


def test_expert_folder_loads_in_a_fresh_process_through_our_loaders(model, tmp_path):
    """The package imports lazily: our loaders import the component modules diffusers needs (TDC outputs)."""
    import subprocess
    import sys

    from diffusers_stages import StageAwareImagePipeline

    StageAwareImagePipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path)
    code = (
        "import sys; from diffusers_stages import StageAwareImagePipeline\n"
        "from diffusers_stages.pipelines import load_pipeline\n"
        "for load in (StageAwareImagePipeline.from_pretrained, load_pipeline):\n"
        "    print(type(load(sys.argv[1]).unet).__name__)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["StageExpertsUNet", "StageExpertsUNet"]

"""Stage switching around the stock pipelines' own ``__call__`` (a UNet forward pre-hook), and its restores."""

import copy

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from diffusers_stages import (
    StageAwareStableDiffusionImg2ImgPipeline,
    StageAwareStableDiffusionInpaintPipeline,
    StageAwareStableDiffusionPipeline,
    StageAwareStableDiffusionXLPipeline,
    StageLoraAdapters,
    TimestepStages,
    switch_stage_experts,
)
from diffusers_stages.deme.norms_and_biases import peft_supports_norms_and_biases
from diffusers_stages.testing import (
    save_tiny_ip_adapter,
    tiny_stable_diffusion_pipeline,
    tiny_stable_diffusion_xl_pipeline,
    tiny_unet_2d,
)

NEEDS_PEFT = pytest.mark.skipif(not peft_supports_norms_and_biases(), reason="train_norms_and_biases needs newer PEFT")
STAGES = TimestepStages([500])
STEPS = 4  # DDIM (steps_offset=1): t = 751, 501 (stage 1), 251, 1 (stage 0)
SIZE = {"height": 32, "width": 32}  # 16 x 16 latents: fast


def attach_random_adapters(unet, stages=STAGES, **kwargs):
    """Stage adapters with a non-zero, per-stage B (PEFT's default B = 0 would make every adapter a no-op), and with
    ``train_norms_and_biases`` per-stage LoRA biases and norm copies moved off the base values."""
    adapters = StageLoraAdapters.attach(unet, stages, rank=4, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return adapters


def image_inputs(kind):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    return {"img2img": {"image": image, "strength": 0.8}, "inpaint": {"image": image, "mask_image": mask}}.get(
        kind, {}
    )


def build(kind, **adapter_kwargs):
    if kind == "sdxl":
        pipe = StageAwareStableDiffusionXLPipeline(**tiny_stable_diffusion_xl_pipeline().components)
    else:
        cls = {
            "txt2img": StageAwareStableDiffusionPipeline,
            "img2img": StageAwareStableDiffusionImg2ImgPipeline,
            "inpaint": StageAwareStableDiffusionInpaintPipeline,
        }[kind]
        pipe = cls(**tiny_stable_diffusion_pipeline().components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_stage_adapters(attach_random_adapters(pipe.unet, **adapter_kwargs))
    return pipe


def record_served_experts(unet, layers):
    """Per UNet call: the stage of its timestep and the adapters fused into the weights while it ran."""
    served = []

    def hook(module, args, kwargs, output):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        stage = int(STAGES.stage_index(torch.as_tensor(t).reshape(-1)[:1]))
        served.append((stage, sorted({name for layer in layers for name in layer.merged_adapters})))

    return served, unet.register_forward_hook(hook, with_kwargs=True)


def state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def assert_restored(adapters, before, active, num_layers, num_norm_copies=0):
    after = adapters.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    layers = list(adapters.lora_layers)
    assert len(layers) == num_layers and not any(layer.merged for layer in layers)
    assert len(list(adapters.norm_copies)) == num_norm_copies
    assert adapters.active == active


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint", "sdxl"])
@torch.no_grad()
def test_stock_call_switches_stages_and_restores_weights(kind):
    pipe = build(kind)
    adapters = pipe.stage_adapters
    layers = list(adapters.lora_layers)
    kwargs = dict(prompt="a cat", num_inference_steps=STEPS, output_type="latent", guidance_scale=3.0, **SIZE)
    kwargs.update(image_inputs(kind))
    before, active = state(pipe.unet), adapters.active

    served, handle = record_served_experts(pipe.unet, layers)
    try:
        fused = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    stages = [stage for stage, _ in served]
    assert stages == ([1, 0, 0] if kind == "img2img" else [1, 1, 0, 0])  # strength 0.8: t = 501, 251, 1
    assert all(merged == [f"stage{stage}"] for stage, merged in served)  # the right expert served every call
    assert_restored(adapters, before, active, len(layers))

    unfused = pipe(**kwargs, generator=torch.Generator().manual_seed(0), lora_mode="unfused").images
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=0)
    assert_restored(adapters, before, active, len(layers))

    def boom(pipe, i, t, tensors):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe(**kwargs, callback_on_step_end=boom)
    assert_restored(adapters, before, active, len(layers))

    def interrupt(pipe, i, t, tensors):
        pipe._interrupt = True
        return tensors

    pipe(**kwargs, callback_on_step_end=interrupt)
    assert_restored(adapters, before, active, len(layers))


NORM, CONV = "down_blocks.0.resnets.0.norm1", "down_blocks.0.resnets.0.conv1"


@NEEDS_PEFT
@torch.no_grad()
def test_per_stage_norms_and_biases_serve_their_stage_in_both_modes_and_are_restored():
    """Fuse mode writes each stage's norms and biases into the plain modules (at the call's LoRA scale s:
    ``n + s (n_k - n)``, ``b + s b_k``); unfused mode runs the stage's norm copies; both agree and restore bit-exactly."""
    pipe = build("txt2img", train_norms_and_biases=True)
    adapters = pipe.stage_adapters
    wrapper, conv = pipe.unet.get_submodule(NORM), pipe.unet.get_submodule(CONV)
    copies = {k: wrapper.modules_to_save[f"stage{k}"].weight.clone() for k in (0, 1)}
    base_norm, base_bias = wrapper.original_module.weight.clone(), conv.get_base_layer().bias.clone()
    lora_bias = {k: conv.lora_B[f"stage{k}"].bias.clone() for k in (0, 1)}  # alpha = r: scaling 1
    num_layers, num_copies = len(list(adapters.lora_layers)), len(list(adapters.norm_copies))
    before, active = state(pipe.unet), adapters.active
    served = []

    def hook(module, args, kwargs, output):
        stage = int(STAGES.stage_index(torch.as_tensor(kwargs.get("timestep", args[1])).reshape(-1)[:1]))
        fused_bias = module.get_submodule(CONV).bias.clone()  # the plain conv in fuse mode
        served.append((stage, module.get_submodule(NORM).weight.clone(), fused_bias))  # unfused: the active copy

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    out = {}
    try:
        for mode, scale in (("fuse", 1.0), ("unfused", 1.0), ("fuse", 0.5)):
            served.clear()
            out[mode, scale] = pipe(
                "a cat", num_inference_steps=STEPS, output_type="latent", **SIZE, lora_mode=mode,
                cross_attention_kwargs={"scale": scale}, generator=torch.Generator().manual_seed(0),
            ).images  # fmt: skip
            assert [stage for stage, _, _ in served] == [1, 1, 0, 0]
            for stage, norm, bias in served:
                torch.testing.assert_close(norm, base_norm + scale * (copies[stage] - base_norm), atol=1e-7, rtol=0)
                if mode == "fuse":
                    torch.testing.assert_close(bias, base_bias + scale * lora_bias[stage], atol=1e-7, rtol=0)
            assert_restored(pipe.stage_adapters, before, active, num_layers, num_copies)
    finally:
        handle.remove()
    torch.testing.assert_close(out["fuse", 1.0], out["unfused", 1.0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_stock_arguments_reach_the_stock_loop():
    """`cross_attention_kwargs` (LoRA scale), `guidance_rescale` and `timesteps` work as in the stock call."""
    pipe = build("txt2img")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    args = dict(prompt="a cat", guidance_rescale=0.7, timesteps=[901, 601, 301, 1], output_type="latent")
    out = {}
    for mode in ("fuse", "unfused"):
        for scale in (1.0, 0.5):
            out[mode, scale] = pipe(
                **args, **SIZE, cross_attention_kwargs={"scale": scale}, lora_mode=mode, generator=torch.manual_seed(0)
            ).images
    for scale in (1.0, 0.5):
        torch.testing.assert_close(
            out["fuse", scale], out["unfused", scale], atol=1e-4, rtol=1e-4
        )  # fused weights round
    assert (out["fuse", 1.0] - out["fuse", 0.5]).abs().max() > 1e-3  # the scale reaches the fused update


def test_bad_call_arguments_are_refused_before_sampling():
    pipe = build("txt2img")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("a cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="prompt"):
        pipe([], num_inference_steps=2)


@pytest.mark.parametrize("norms", [False, pytest.param(True, marks=NEEDS_PEFT)], ids=["lora", "lora+norms"])
@torch.no_grad()
def test_context_manager_on_a_bare_unet_survives_a_dtype_change_mid_call(norms):
    """Fuse mode keeps working when the UNet moves mid-call (model CPU offload moves devices; here: dtype)."""
    unet = tiny_unet_2d().eval()
    adapters = attach_random_adapters(unet, target_modules=["to_q", "to_v"], train_norms_and_biases=norms)
    before = state(unet)
    reference = copy.deepcopy(unet).double()  # unfused PEFT side branches on a float64 copy: the oracle
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with switch_stage_experts(unet, adapters):
        unet(x, 900)
        unet.to(torch.float64)
        out = unet(x.double(), 100).sample
    for layer in reference.modules():
        if isinstance(layer, (LoraLayer, ModulesToSaveWrapper)):
            layer.set_adapter("stage0")
    torch.testing.assert_close(out, reference(x.double(), 100).sample, atol=1e-10, rtol=0)
    after = unet.state_dict()
    assert all(torch.equal(after[k], before[k].double()) for k in before)  # restored, in the new dtype
    adapters.set_stage(1)
    assert unet(x.double(), 900).sample.dtype == torch.float64  # the LoRA layers and norm copies followed the UNet


@NEEDS_PEFT
def test_fuse_mode_refuses_a_norm_copy_carrying_hooks():
    """Fuse mode swaps the norm wrappers out for the call, which would skip a hook on one: refused, nothing changed."""
    unet = tiny_unet_2d().eval()
    adapters = attach_random_adapters(unet, target_modules=["to_q"], train_norms_and_biases=True)
    before = state(unet)
    unet.conv_norm_out.register_forward_hook(lambda module, args, output: output)
    with pytest.raises(ValueError, match="conv_norm_out` carries hooks"), switch_stage_experts(unet, adapters):
        pass
    after = unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with switch_stage_experts(unet, adapters, lora_mode="unfused"):
        unet(torch.randn(1, 1, 8, 8), 900)


def test_mixed_stage_batch_is_refused():
    unet = tiny_unet_2d().eval()
    adapters = attach_random_adapters(unet, target_modules=["to_q", "to_v"])
    with switch_stage_experts(unet, adapters), pytest.raises(ValueError, match="mixes timesteps of stages"):
        unet(torch.randn(2, 1, 8, 8), torch.tensor([900, 100]))


def test_bf16_copy_of_the_base_is_accepted(tmp_path):
    unet = tiny_unet_2d()
    base = copy.deepcopy(unet)
    attach_random_adapters(unet, target_modules=["to_q", "to_v"]).save_pretrained(tmp_path)
    loaded = StageLoraAdapters.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    assert loaded.stages == STAGES
    StageLoraAdapters.from_pretrained(copy.deepcopy(base).half(), tmp_path)
    other = tiny_unet_2d(seed=1)
    with pytest.raises(ValueError, match="not the base model"):
        StageLoraAdapters.from_pretrained(other.to(torch.bfloat16), tmp_path)


@torch.no_grad()
def test_channel_projection_follows_the_unet_device():
    """The projection is not a UNet submodule: its hook moves it to the UNet's device (``meta`` stands in for a GPU)."""
    unet = tiny_unet_2d().eval()
    adapters = attach_random_adapters(unet, target_modules=["to_q"], channel_projection=True)
    adapters.set_stage(1)
    unet.to("meta")
    assert unet(torch.randn(2, 1, 8, 8, device="meta"), 900).sample.device.type == "meta"
    assert next(adapters.projection.parameters()).device.type == "meta"


@pytest.mark.parametrize("norms", [False, pytest.param(True, marks=NEEDS_PEFT)], ids=["lora", "lora+norms"])
def test_stock_signature_class_saves_and_reloads_its_adapters(tmp_path, norms):
    """A class whose `__init__` is the stock one finds `stage_adapters/` next to `model_index.json` when loading."""
    pipe = build("img2img", train_norms_and_biases=norms)
    pipe.save_pretrained(tmp_path)
    loaded = StageAwareStableDiffusionImg2ImgPipeline.from_pretrained(tmp_path)
    assert loaded.stage_adapters is not None and loaded.stage_adapters.stages == STAGES
    expected = pipe.unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.unet.state_dict().items())


@torch.no_grad()
def test_ip_adapter_loaded_by_diffusers_reaches_every_switched_call(tmp_path):
    """A stock `StableDiffusionPipeline` with an IP-Adapter from diffusers' own `load_ip_adapter` (tiny, offline)
    samples under `switch_stage_experts`: the image embeddings reach every UNet call, the right stage adapter serves
    each call, `ip_adapter_image` and its precomputed `ip_adapter_image_embeds` agree, and fused equals unfused."""
    pipe = tiny_stable_diffusion_pipeline()
    save_tiny_ip_adapter(pipe.unet, tmp_path / "ip")
    adapters = attach_random_adapters(pipe.unet)
    pipe.load_ip_adapter(str(tmp_path), subfolder="ip", weight_name="ip_adapter.safetensors")
    assert isinstance(pipe.image_encoder, CLIPVisionModelWithProjection)  # diffusers loaded the tiny encoder too
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kwargs = dict(prompt="a cat", num_inference_steps=STEPS, output_type="latent", guidance_scale=3.0, **SIZE)
    layers, before, active = list(adapters.lora_layers), state(pipe.unet), adapters.active

    def sample(mode, **ip):
        served, handle = record_served_experts(pipe.unet, layers)
        embeds = []
        probe = pipe.unet.register_forward_pre_hook(
            lambda m, a, kw: embeds.append(kw["added_cond_kwargs"]["image_embeds"][0].shape), with_kwargs=True
        )
        try:
            with switch_stage_experts(pipe.unet, adapters, lora_mode=mode):
                out = pipe(**kwargs, **ip, generator=torch.Generator().manual_seed(0)).images
        finally:
            handle.remove()
            probe.remove()
        assert embeds == [(2, 1, 32)] * STEPS  # (uncond + cond, one image, the encoder's embedding width)
        return out, served

    fused, served = sample("fuse", ip_adapter_image=image)
    assert [stage for stage, _ in served] == [1, 1, 0, 0]
    assert all(merged == [f"stage{stage}"] for stage, merged in served)
    assert_restored(adapters, before, active, len(layers))
    unfused, _ = sample("unfused", ip_adapter_image=image)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    embeds = pipe.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)
    from_embeds, _ = sample("fuse", ip_adapter_image_embeds=embeds)
    torch.testing.assert_close(from_embeds, fused, atol=1e-6, rtol=0)
    pipe.set_ip_adapter_scale(0.0)
    without, _ = sample("fuse", ip_adapter_image=image)
    assert (without - fused).abs().max() > 1e-3  # the IP-Adapter changes the samples: not a silent no-op

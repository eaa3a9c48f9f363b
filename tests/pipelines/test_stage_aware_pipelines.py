"""Stage-aware pipelines with the three kinds of experts: per-stage LoRA, per-stage UNets, multi-decoder UNets."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, HeunDiscreteScheduler, StableDiffusionPipeline
from peft.tuners.lora import LoraLayer

from diffusers_stages import (
    FDMDDIMScheduler,
    FDMEDMScheduler,
    MultiDecoderUNet2DModel,
    StageAwareImagePipeline,
    StageAwareStableDiffusionPipeline,
    StageExpertsUNet,
    StageLoraAdapters,
    TimestepStages,
)
from diffusers_stages.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d

REPO = Path(__file__).resolve().parents[2]
STAGES = TimestepStages([500])
STEPS = 4  # DDIM (steps_offset=1): t = 751, 501 (stage 1), 251, 1 (stage 0)


def randomise_lora(unet, seed=0):
    """Default adapters are no-ops (B = 0): give every stage its own non-zero B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def lora_sd_pipeline():
    pipe = StageAwareStableDiffusionPipeline(**tiny_stable_diffusion_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    adapters = StageLoraAdapters.attach(pipe.unet, STAGES, rank=4)
    randomise_lora(pipe.unet)
    pipe.load_stage_adapters(adapters)
    return pipe


def unet_state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def assert_same_state(unet, before):
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def lora_pipe():
    return lora_sd_pipeline()


def hand_written_sd_loop(pipe, prompt, negative, guidance_scale, seed):
    """The oracle: the stock loop with ``adapters.set_stage(stage(t))`` (unfused) before every UNet call."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    embeds = torch.cat([uncond, cond])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    x = torch.randn((len(prompt), 4, 32, 32), generator=g) * scheduler.init_noise_sigma
    adapters = pipe.stage_adapters
    for t in scheduler.timesteps:
        adapters.set_stage(int(STAGES.stage_index(t)))
        eps_u, eps_c = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=embeds).sample.chunk(2)
        x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    adapters.set_stage(0)
    return x


@torch.no_grad()
def test_lora_pipeline_equals_hand_written_loop_fused_and_unfused(lora_pipe):
    prompt, negative = ["a red square", "a blue cat"], ["blurry", "dark"]
    reference = hand_written_sd_loop(lora_pipe, prompt, negative, 4.0, seed=3)
    kwargs = dict(prompt=prompt, negative_prompt=negative, guidance_scale=4.0, num_inference_steps=STEPS)
    unfused = lora_pipe(
        **kwargs, generator=torch.Generator().manual_seed(3), output_type="latent", lora_mode="unfused"
    )
    fused = lora_pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="latent")
    torch.testing.assert_close(unfused.images, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.images, reference, atol=1e-4, rtol=0)
    # the adapters matter: the stock pipeline on the base model gives another result
    base = tiny_stable_diffusion_pipeline()(**kwargs, generator=torch.Generator().manual_seed(3), output_type="latent")
    assert (base.images - reference).abs().max() > 1e-2


@torch.no_grad()
def test_fuse_happens_once_per_stage(lora_pipe, monkeypatch):
    import diffusers_stages.pipelines.lora_switcher as module

    writes, tensors, fused = [], [], []
    original = module.fused_tensors

    def counting(*args):  # every value fuse mode writes, counted
        made = original(*args)
        for tensor in made:
            tensor.fused = lambda *a, f=tensor.fused: writes.append(1) or f(*a)
        tensors.extend(made)
        return made

    monkeypatch.setattr(module, "fused_tensors", counting)
    layers = list(lora_pipe.stage_adapters.lora_layers)

    def record(pipe, i, t, kwargs):
        fused.append(sorted({name for layer in layers for name in layer.merged_adapters}))
        wrapped.append(any(isinstance(m, LoraLayer) for m in pipe.unet.modules()))
        return kwargs

    wrapped = []
    lora_pipe("x", num_inference_steps=STEPS, output_type="latent", callback_on_step_end=record)
    assert fused == [["stage1"], ["stage1"], ["stage0"], ["stage0"]]
    assert not any(wrapped)  # a fused step runs the plain UNet's modules, no PEFT dispatch
    assert any(isinstance(m, LoraLayer) for m in lora_pipe.unet.modules())  # and the wrappers are back after it
    assert len(tensors) >= len(layers) and len(writes) == 2 * len(tensors)  # one fuse per stage, not per step


@torch.no_grad()
def test_state_is_restored_after_call_exception_and_interrupt(lora_pipe):
    adapters = lora_pipe.stage_adapters
    adapters.set_weights([0.25, 0.75])  # a non-default state the call must give back
    before, active = unet_state(lora_pipe.unet), adapters.active
    lora_pipe("x", num_inference_steps=STEPS, output_type="latent")
    assert_same_state(lora_pipe.unet, before) and adapters.active == active

    layers = list(adapters.lora_layers)

    def boom(pipe, i, t, kwargs):
        assert any(layer.merged for layer in layers)  # really fused mid-call
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        lora_pipe("x", num_inference_steps=STEPS, output_type="latent", callback_on_step_end=boom)
    assert_same_state(lora_pipe.unet, before)
    assert adapters.active == active and not any(layer.merged for layer in adapters.lora_layers)

    def interrupt(pipe, i, t, kwargs):
        pipe._interrupt = True
        return kwargs

    lora_pipe("x", num_inference_steps=STEPS, output_type="latent", callback_on_step_end=interrupt)
    assert_same_state(lora_pipe.unet, before) and adapters.active == active
    adapters.set_stage(0)


@torch.no_grad()
def test_identical_experts_equal_the_plain_pipeline():
    plain = tiny_stable_diffusion_pipeline()
    kwargs = dict(
        prompt=["a", "b"], num_inference_steps=3, output_type="np", guidance_scale=3.0, negative_prompt=["c", "d"]
    )
    reference = plain(**kwargs, generator=torch.Generator().manual_seed(0)).images
    experts = StageExpertsUNet.from_experts([plain.unet, plain.unet], STAGES)
    pipe = StageAwareStableDiffusionPipeline(**{**plain.components, "unet": experts})
    pipe.set_progress_bar_config(disable=True)
    assert (pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images == reference).all()


def test_lora_save_load_round_trip_and_custom_pipeline(lora_pipe, tmp_path):
    kwargs = dict(prompt="a cat", num_inference_steps=STEPS, output_type="np")
    before = lora_pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    lora_pipe.save_pretrained(tmp_path)
    assert (tmp_path / "stage_adapters" / "stages.json").is_file()
    assert not any("lora" in k for k in StableDiffusionPipeline.from_pretrained(tmp_path).unet.state_dict())
    loaded = StageAwareStableDiffusionPipeline.from_pretrained(tmp_path)
    custom = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=str(REPO / "pipelines" / "stage_aware_stable_diffusion.py"), trust_remote_code=True
    )
    for pipe in (loaded, custom):
        assert type(pipe).__name__ == "StageAwareStableDiffusionPipeline"
        pipe.set_progress_bar_config(disable=True)
        assert (pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images == before).all()
        assert pipe.stage_adapters.stages == STAGES


def test_bad_input_fails_before_sampling(lora_pipe, tmp_path):
    calls = []
    hook = lora_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        edm = FDMEDMScheduler(solver="euler")  # conditions on 0.25 ln sigma, not on [0, 1000) timesteps
        pipe = StageAwareStableDiffusionPipeline(**{**lora_pipe.components, "scheduler": edm})
        pipe._stage_adapters = lora_pipe.stage_adapters
        with pytest.raises(ValueError, match="stage boundaries"):
            pipe("x", num_inference_steps=3)
        short = DDIMScheduler(num_train_timesteps=500)
        pipe = StageAwareStableDiffusionPipeline(**{**lora_pipe.components, "scheduler": short})
        pipe._stage_adapters = lora_pipe.stage_adapters
        with pytest.raises(ValueError, match="num_train_timesteps=500"):
            pipe("x", num_inference_steps=3)
        with pytest.raises(ValueError, match="lora_mode"):
            lora_pipe("x", num_inference_steps=2, lora_mode="merged")
    finally:
        hook.remove()
    assert calls == []
    # fewer adapters than stages
    lora_pipe.stage_adapters.save_pretrained(tmp_path / "adapters", stages=[0])
    other = StageAwareStableDiffusionPipeline(**tiny_stable_diffusion_pipeline().components)
    with pytest.raises(ValueError, match="stage"):
        other.load_stage_adapters(tmp_path / "adapters")


# ---------------------------------------------------------------------------------------------- pixel pipeline, FDM
def pixel_reference(expert_for_stage, scheduler, seed, steps=STEPS):
    """The oracle: x_T = init_sigma z; per step the expert of stage(t) on the scaled input, then the scheduler."""
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = expert_for_stage(int(STAGES.stage_index(t)))(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def fdm():
    return FDMDDIMScheduler(num_train_timesteps=1000)


@pytest.mark.parametrize("kind", ["lora", "experts", "multi_decoder"])
@torch.no_grad()
def test_every_kind_of_expert_with_an_fdm_scheduler(kind, tmp_path):
    unet = tiny_unet_2d().eval()
    if kind == "lora":
        pipe = StageAwareImagePipeline(unet=unet, scheduler=fdm())
        adapters = StageLoraAdapters.attach(unet, STAGES, rank=4, target_modules=["to_q", "to_v"])
        randomise_lora(unet)
        pipe.load_stage_adapters(adapters)

        def expert(k):
            adapters.set_stage(k)
            return unet

    elif kind == "experts":
        experts = [tiny_unet_2d(seed=1).eval(), tiny_unet_2d(block_out_channels=(16, 32, 32), seed=2).eval()]
        pipe = StageAwareImagePipeline(unet=StageExpertsUNet.from_experts(experts, STAGES), scheduler=fdm())
        expert = experts.__getitem__
    else:
        model = MultiDecoderUNet2DModel.from_unet(unet, STAGES, decoder_block_out_channels=[[32, 64, 64], [8, 16, 16]])
        pipe = StageAwareImagePipeline(unet=model.eval(), scheduler=fdm())

        def expert(k):
            return model

    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5), output_type="pt")
    reference = pixel_reference(expert, fdm(), seed=5)
    torch.testing.assert_close(out.images, (reference / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
    # save / load round trip of the whole pipeline, experts included
    pipe.save_pretrained(tmp_path)
    loaded = StageAwareImagePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(
        batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5), output_type="pt"
    )
    assert torch.equal(again.images, out.images)


@torch.no_grad()
def test_multi_decoder_unet_gets_the_known_stage_without_routing(monkeypatch):
    """The pipeline reads the stages of the schedule once and passes `stage=`: no step reads its timestep."""
    model = MultiDecoderUNet2DModel.from_unet(
        tiny_unet_2d(), STAGES, decoder_block_out_channels=[[32, 64, 64], [8, 16, 16]]
    ).eval()
    reads, served = [], []
    read_on_host = model.host_stage_indices  # the model's eager routing: a host read (device sync) of the timesteps
    monkeypatch.setattr(
        model, "host_stage_indices", lambda t: reads.append(torch.as_tensor(t).numel()) or read_on_host(t)
    )
    for k, decoder in enumerate(model.decoders):
        decoder.conv_out.register_forward_pre_hook(lambda *args, k=k: served.append(k))
    pipe = StageAwareImagePipeline(unet=model, scheduler=HeunDiscreteScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5), output_type="pt")
    schedule = pipe.scheduler.timesteps  # Heun: 2 * STEPS - 1 model calls
    assert reads == [len(schedule)]  # one read of the whole schedule, none inside the model calls
    assert served == [int(STAGES.stage_index(t)) for t in schedule] and set(served) == {0, 1}
    reads.clear()
    reference = pixel_reference(lambda k: model, HeunDiscreteScheduler(num_train_timesteps=1000), seed=5)
    assert reads == [1] * len(schedule)  # without `stage=` the model reads every call's timestep
    assert torch.equal(out.images, (reference / 2 + 0.5).clamp(0, 1))


def test_push_to_hub_uploads_pipeline_adapters_card_and_custom_pipeline(lora_pipe, tmp_path, monkeypatch):
    import diffusers_stages.hub as hub

    uploaded = {}

    def fake_push(folder, repo_id, **kwargs):  # the real check, then record instead of uploading
        uploaded["files"] = hub.check_upload_folder(folder)
        uploaded["card"] = (Path(folder) / "README.md").read_text()
        uploaded["pipeline.py"] = (Path(folder) / "pipeline.py").read_text()
        return f"https://hub/{repo_id}/commit/1"

    monkeypatch.setattr(hub, "push_to_hub", fake_push)
    url = lora_pipe.push_to_hub("user/deme-before-merge", token="hf_fake", base_model="tiny/sd")
    assert url == "https://hub/user/deme-before-merge/commit/1"
    files = uploaded["files"]
    assert {"model_index.json", "README.md", "pipeline.py", "stage_adapters/stages.json"} <= set(files)
    assert {"stage_adapters/stage0/pytorch_lora_weights.safetensors", "unet/config.json"} <= set(files)
    card = uploaded["card"]
    assert "library_name: diffusers" in card and "per-stage LoRA adapters" in card and "| 1 | [500, 1000) |" in card
    assert "StageAwareStableDiffusionPipeline" in uploaded["pipeline.py"]

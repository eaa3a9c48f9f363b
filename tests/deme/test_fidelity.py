"""The authors' DeMe settings: antithetic timesteps, EMA of the finetuned weights, full-parameter finetuning."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file

from diffusers_stages import StageLoraConfig, TimestepStages, train_stage_lora
from diffusers_stages.deme.ema import StageEMA
from diffusers_stages.deme.losses import sample_antithetic_timesteps
from diffusers_stages.deme.merging import merge_stage_adapters
from diffusers_stages.testing import tiny_unet_2d


def reference_antithetic(lo, hi, bsz, draws):
    """The authors' lines: `t = randint(lo, hi, bsz // 2 + 1); cat([t, lo + hi - t - 1])[:bsz]`."""
    return torch.cat([draws, hi + lo - draws - 1], dim=0)[:bsz]


@pytest.mark.parametrize("batch_size", [1, 4, 7, 16])
@pytest.mark.parametrize("p, anywhere", [(0.0, False), (1.0, True)])
def test_antithetic_timesteps_follow_the_authors_formula(batch_size, p, anywhere):
    stages = TimestepStages.uniform(4)
    g = torch.Generator().manual_seed(3)
    t = sample_antithetic_timesteps(stages, 2, batch_size, p, g)
    lo, hi = (0, 1000) if anywhere else stages.timestep_range(2)
    g = torch.Generator().manual_seed(3)
    torch.rand((), generator=g)
    draws = torch.randint(lo, hi, (batch_size // 2 + 1,), generator=g)
    assert torch.equal(t, reference_antithetic(lo, hi, batch_size, draws))
    assert int(t.min()) >= lo and int(t.max()) < hi


def test_antithetic_prob_sampling_is_chosen_per_batch():
    stages = TimestepStages.uniform(4)
    g = torch.Generator().manual_seed(0)
    lo, hi = stages.timestep_range(0)
    batches = [sample_antithetic_timesteps(stages, 0, 8, 0.3, g) for _ in range(400)]
    outside = [bool(((b < lo) | (b >= hi)).any()) for b in batches]
    frac = sum(outside) / len(batches)
    assert 0.2 < frac < 0.36  # ~ p (1 - 0.25^8) ~ 0.3


def test_stage_ema_matches_the_warmup_formula():
    params = {0: [torch.nn.Parameter(torch.zeros(3))]}
    ema = StageEMA(lambda k: params[k], [0], max_decay=0.9, inv_gamma=1.0, power=0.75)
    ref = None
    for n in range(1, 8):
        with torch.no_grad():
            params[0][0].add_(float(n))
        ema.step(0)
        d = 0.0 if n == 1 else min(0.9, 1 - (1 + (n - 1)) ** -0.75)
        x = params[0][0].detach().clone()
        ref = x if ref is None else d * ref + (1 - d) * x
    trained = params[0][0].detach().clone()
    with ema.applied():
        torch.testing.assert_close(params[0][0].detach(), ref)
    assert torch.equal(params[0][0].detach(), trained)  # restored


@pytest.fixture
def ddpm_folder(tmp_path):
    DDPMPipeline(unet=tiny_unet_2d(sample_size=8), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    return tmp_path / "ddpm"


def test_full_finetuning_saves_bf16_task_vectors_that_merge_exactly(ddpm_folder, tmp_path, fresh_accelerator_state):
    config = StageLoraConfig(
        pretrained_model_name_or_path=str(ddpm_folder), dataset_name="digits", resolution=8, train_batch_size=4,
        max_train_steps=2, num_stages=2, learning_rate=1e-3, finetune="full", use_ema=True, ema_max_decay=0.5,
        antithetic_timesteps=True, prob_sampling=0.3, consistency_loss=True, adam_beta1=0.95,
        output_dir=str(tmp_path / "full"),
    )  # fmt: skip
    train_stage_lora(config)
    base = tiny_unet_2d(sample_size=8)
    for k in range(2):
        tau = load_file(tmp_path / "full" / f"stage{k}" / "task_vector.safetensors")
        assert set(tau) == set(base.state_dict()) and all(v.dtype == torch.bfloat16 for v in tau.values())
        assert tau["conv_norm_out.weight"].abs().max() > 0 and tau["time_embedding.linear_1.bias"].abs().max() > 0
        info = json.loads((tmp_path / "full" / f"stage{k}" / "stage_adapter.json").read_text())
        assert info["finetune"] == "full" and info["training"]["use_ema"] is True
    merged = merge_stage_adapters(tiny_unet_2d(sample_size=8), tmp_path / "full", [0.0, 1.0])
    tau1 = load_file(tmp_path / "full" / "stage1" / "task_vector.safetensors")
    for name, w in base.state_dict().items():
        assert torch.equal(merged.state_dict()[name], (w.double() + tau1[name].double()).float()), name
    with pytest.raises(ValueError, match="channel_projection"):
        StageLoraConfig(pretrained_model_name_or_path="x", dataset_name="d", finetune="full", channel_projection=True)


@pytest.mark.parametrize("kind", ["pixel", "text"])
def test_default_lora_covers_every_linear_and_conv_and_merges_to_the_adapted_model(kind, tmp_path):
    from diffusers_stages import StageLoraAdapters
    from diffusers_stages.testing import tiny_unet_2d_condition

    make = (lambda: tiny_unet_2d(sample_size=8)) if kind == "pixel" else (lambda: tiny_unet_2d_condition(16))
    unet = make()
    layers = {n for n, m in make().named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    adapters = StageLoraAdapters.attach(unet, TimestepStages.uniform(3), rank=2, lora_alpha=3.0)
    from peft.tuners.lora import LoraLayer

    adapted_layers = {n for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert adapted_layers == layers and {"conv_in", "conv_out"} <= layers
    assert any("time_embedding" in n for n in layers)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    adapters.save_pretrained(tmp_path)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    kw = {} if kind == "pixel" else {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}
    t = torch.tensor([10, 700])
    adapters.set_stage(1)
    with torch.no_grad():
        adapted = unet(x, t, **kw).sample
        merged = merge_stage_adapters(make(), tmp_path, [0.0, 1.0, 0.0])(x, t, **kw).sample
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("antithetic", [False, True])
def test_shards_of_a_micro_batch_draw_what_one_process_draws(antithetic):
    """Two processes of batch 3 (shards 0 and 1) use the timesteps and noise of one process of batch 6; with
    ``antithetic_timesteps`` the pairs ``t``, ``lo + hi - 1 - t`` and the per-batch range span the two shards."""
    from diffusers_stages import StageLoraAdapters, deme_training_step

    unet = tiny_unet_2d(sample_size=8)
    adapters = StageLoraAdapters.attach(unet, TimestepStages.uniform(4), rank=2)
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def step(rows: slice, num_shards: int, shard_index: int):
        g = torch.Generator().manual_seed(7)
        noise_gens = [torch.Generator().manual_seed(100 + j) for j in range(rows.start, rows.stop)]
        return deme_training_step(
            unet, adapters, DDPMScheduler(), x0[rows], 1, g, prob_sampling=0.5, antithetic_timesteps=antithetic,
            noise_generators=noise_gens, num_shards=num_shards, shard_index=shard_index,
        )  # fmt: skip

    whole = step(slice(0, 6), 1, 0)
    shards = [step(slice(3 * r, 3 * r + 3), 2, r) for r in range(2)]
    assert torch.equal(torch.cat([s.timesteps for s in shards]), whole.timesteps)
    torch.testing.assert_close((shards[0].loss + shards[1].loss) / 2, whole.loss)
    if antithetic:  # 6 // 2 + 1 = 4 draws, then the mirrors of the first two: t_4 on shard 1 pairs t_0 on shard 0
        t = whole.timesteps  # the first draw of the shared generator chooses the range of the whole micro-batch
        anywhere = bool(torch.rand((), generator=torch.Generator().manual_seed(7)) < 0.5)
        lo, hi = (0, 1000) if anywhere else (250, 500)
        assert torch.equal(t[:2] + t[4:], torch.full((2,), lo + hi - 1))
    with pytest.raises(ValueError, match="`shard_index`"):
        step(slice(0, 3), 2, 2)

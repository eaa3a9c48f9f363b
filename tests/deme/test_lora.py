"""Per-stage LoRA adapters, the exact merge, and DeMe's finetuning techniques on tiny real UNets."""

import os
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from diffusers_stages import (
    StageLoraAdapters,
    TimestepStages,
    deme_loss,
    deme_training_step,
    grid_search_merge_weights,
    merge_stage_adapters,
    sample_deme_timesteps,
    switch_stage_experts,
)
from diffusers_stages.deme.adapters import LORA_WEIGHT_NAME
from diffusers_stages.testing import tiny_unet_2d, tiny_unet_2d_condition

RANK, ALPHA = 2, 6.0  # alpha != rank: a lost alpha would change every number below
WEIGHTS = [0.3, 0.9, 0.55]


def make_unet(kind: str, seed: int = 0):
    return tiny_unet_2d(sample_size=8, seed=seed) if kind == "pixel" else tiny_unet_2d_condition(16, seed=seed)


def inputs(unet):
    g = torch.Generator().manual_seed(1)
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(2, c, s, s, generator=g)
    kw = {} if unet.config.in_channels == 1 else {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}
    return x, kw


def randomised_adapters(kind: str, channel_projection: bool = False, rank: int = RANK, seed: int = 0):
    """Adapters on every attention projection and resnet conv, with random B (PEFT's default B = 0 is a no-op)."""
    unet = make_unet(kind, seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    adapters = StageLoraAdapters.attach(
        unet, TimestepStages.uniform(3), rank=rank, lora_alpha=ALPHA, target_modules=targets,
        channel_projection=channel_projection,
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if channel_projection:
            for name in adapters.stages.adapter_names:
                for p in adapters.projection.matrices[name]:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    return adapters


@pytest.mark.parametrize("channel_projection", [False, True])
@pytest.mark.parametrize("kind", ["pixel", "text"])
def test_merge_equals_weighted_adapters_and_reference(kind, channel_projection, tmp_path):
    adapters = randomised_adapters(kind, channel_projection)
    unet = adapters.unet
    x, kw = inputs(unet)
    t = torch.tensor([50, 900])
    adapters.set_weights(WEIGHTS)
    with torch.no_grad():
        unmerged = unet(x, t, **kw).sample
        with adapters.disabled():
            base_out = unet(x, t, **kw).sample
    assert (unmerged - base_out).abs().max() > 1e-2  # the adapters do something

    adapters.save_pretrained(tmp_path)
    base = make_unet(kind)
    merged = merge_stage_adapters(make_unet(kind), tmp_path, WEIGHTS)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_out = merged(x, t, **kw).sample
    torch.testing.assert_close(merged_out, unmerged, atol=1e-5, rtol=1e-5)

    # reference: W + sum_k w_k (alpha / r) B_k A_k (then P W for the projection sites), computed here
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    sites = adapters.projection.sites if channel_projection else []
    checked = 0
    for name, w0 in base.named_parameters():
        if not name.endswith(".weight") or name[: -len(".weight")] + ".lora_A.stage0.weight" not in lora:
            continue
        mod = name[: -len(".weight")]
        ref = w0.detach().double().clone()
        for k, wk in enumerate(WEIGHTS):
            a, b = lora[f"{mod}.lora_A.stage{k}.weight"].double(), lora[f"{mod}.lora_B.stage{k}.weight"].double()
            ref += wk * (ALPHA / RANK) * (b.flatten(1) @ a.flatten(1)).reshape(ref.shape)
        if mod in sites:
            i = sites.index(mod)
            eye = torch.eye(ref.shape[0], dtype=torch.float64)
            p = eye + sum(
                wk * (adapters.projection.matrices[f"stage{k}"][i].double() - eye) for k, wk in enumerate(WEIGHTS)
            )
            ref = (p @ ref.flatten(1)).reshape(ref.shape)
        torch.testing.assert_close(merged.get_parameter(name).double(), ref, atol=1e-6, rtol=1e-6)
        checked += 1
    assert checked >= 6


def test_adapter_files_roundtrip_with_alpha_not_rank(tmp_path):
    adapters = randomised_adapters("text")
    adapters.save_pretrained(tmp_path)
    path = tmp_path / "stage1" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert all(k.startswith("unet.") and ".stage1." not in k for k in keys)
    assert '"unet.lora_alpha": 6.0' in meta["lora_adapter_metadata"] and '"unet.r": 2' in meta["lora_adapter_metadata"]

    reloaded = StageLoraAdapters.from_pretrained(make_unet("text"), tmp_path)
    assert reloaded.config.lora_alpha == ALPHA and reloaded.config.r == RANK
    x, kw = inputs(adapters.unet)
    t = torch.tensor([400, 600])
    for ad in (adapters, reloaded):
        ad.set_stage(1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.unet(x, t, **kw).sample, adapters.unet(x, t, **kw).sample)


def test_stock_diffusers_reads_a_stage_adapter_with_its_alpha(tmp_path):
    """The per-stage file is the standard diffusers LoRA format: `load_lora_adapter` restores alpha from metadata."""
    adapters = randomised_adapters("text")
    adapters.save_pretrained(tmp_path)
    stock = make_unet("text")
    # weight_name: diffusers < 0.40 refuses to guess the file name of a local folder in offline mode (the tests' mode)
    stock.load_lora_adapter(
        str(tmp_path / "stage2"), weight_name=LORA_WEIGHT_NAME, adapter_name="s2", prefix="unet", use_safetensors=True
    )
    adapters.set_stage(2)
    x, kw = inputs(stock)
    t = torch.tensor([800, 900])
    with torch.no_grad():
        torch.testing.assert_close(stock(x, t, **kw).sample, adapters.unet(x, t, **kw).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channel_projection", [False, True])
@pytest.mark.parametrize("lora_mode", ["unfused", "fuse"])
def test_switching_context_picks_the_adapter_of_each_timestep(lora_mode, channel_projection):
    """`switch_stage_experts` (the one stage switching: pipelines and DeMe validation use it) on a bare UNet."""
    adapters = randomised_adapters("pixel", channel_projection=channel_projection)
    x, _ = inputs(adapters.unet)
    outs = {}
    with torch.no_grad():
        for k, t in enumerate([100, 500, 900]):
            adapters.set_stage(k)
            outs[t] = adapters.unet(x, torch.tensor([t, t])).sample
        adapters.set_stage(0)
        with switch_stage_experts(adapters.unet, adapters, lora_mode=lora_mode):
            for t, expected in outs.items():
                torch.testing.assert_close(adapters.unet(x, torch.tensor(t)).sample, expected, atol=1e-5, rtol=1e-5)
            with pytest.raises(ValueError, match="mixes timesteps"):
                adapters.unet(x, torch.tensor([100, 900]))
        assert adapters.active == ("stage", 0)  # the state before the context is restored


def test_errors_missing_stage_mismatched_rank_wrong_base(tmp_path):
    randomised_adapters("pixel").save_pretrained(tmp_path / "a")
    randomised_adapters("pixel", rank=4).save_pretrained(tmp_path / "b")

    shutil.copytree(tmp_path / "a", tmp_path / "missing")
    shutil.rmtree(tmp_path / "missing" / "stage1")
    with pytest.raises(ValueError, match=r"missing the adapters of stage\(s\) \[1\]"):
        merge_stage_adapters(make_unet("pixel"), tmp_path / "missing", WEIGHTS)

    shutil.copytree(tmp_path / "a", tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "stage2")
    shutil.copytree(tmp_path / "b" / "stage2", tmp_path / "mixed" / "stage2")
    with pytest.raises(ValueError, match="disagree on `r`"):
        StageLoraAdapters.from_pretrained(make_unet("pixel"), tmp_path / "mixed")

    with pytest.raises(ValueError, match="not the base model"):
        merge_stage_adapters(make_unet("pixel", seed=1), tmp_path / "a", WEIGHTS)
    with pytest.raises(ValueError, match="one weight per stage"):
        merge_stage_adapters(make_unet("pixel"), tmp_path / "a", [1.0])
    with pytest.raises(ValueError, match="(?i)target.modules"):
        StageLoraAdapters.attach(make_unet("pixel"), TimestepStages.uniform(2), target_modules=["nonexistent"])


def test_grid_search_finds_the_best_weights_and_restores_the_base(tmp_path):
    adapters = randomised_adapters("pixel")
    adapters.save_pretrained(tmp_path)
    target = merge_stage_adapters(make_unet("pixel"), tmp_path, [0.5, 1.0, 0.5])
    name = "down_blocks.0.resnets.0.conv1.weight"
    goal = target.get_parameter(name).detach().clone()
    unet = make_unet("pixel")
    before = unet.get_parameter(name).detach().clone()
    out = grid_search_merge_weights(
        unet, tmp_path, lambda m: float((m.get_parameter(name).detach() - goal).abs().sum()), values=[0.5, 1.0]
    )
    assert out.weights == [0.5, 1.0, 0.5] and len(out.results) == 8 and out.score < 1e-4
    torch.testing.assert_close(unet.get_parameter(name), before)


def test_consistency_loss_is_zero_at_initialisation():
    unet = make_unet("text")
    adapters = StageLoraAdapters.attach(unet, TimestepStages.uniform(4), rank=4)
    x0 = torch.randn(2, 4, 16, 16)
    kw = torch.randn(2, 5, 32)
    out = deme_training_step(
        unet, adapters, DDPMScheduler(), x0, 2, torch.Generator().manual_seed(0), kw, 0.3, consistency_loss=True
    )
    assert out.consistency_loss.item() == 0.0 and out.denoising_loss.item() > 0
    out.loss.backward()
    grads = [p.grad for p in adapters.parameters(2)]
    assert all(g is not None for g in grads) and all(p.grad is None for p in adapters.parameters(0))
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)


def test_deme_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    pred, eps, teacher = (torch.randn(3, 4, generator=g) for _ in range(3))
    out = deme_loss(pred, eps, teacher, consistency_weight=0.5)
    ref = ((eps - pred) ** 2).mean() + 0.5 * ((teacher - pred) ** 2).mean()
    torch.testing.assert_close(out.loss, ref)
    assert deme_loss(pred, eps).consistency_loss.item() == 0.0


def test_probabilistic_sampling():
    stages = TimestepStages.uniform(4)
    g = torch.Generator().manual_seed(0)
    t = sample_deme_timesteps(stages, 1, 20000, prob_sampling=0.0, generator=g)
    assert int(t.min()) >= 250 and int(t.max()) < 500
    t = sample_deme_timesteps(stages, 1, 20000, prob_sampling=0.3, generator=g)
    outside = ((t < 250) | (t >= 500)).float().mean().item()
    assert abs(outside - 0.3 * 0.75) < 0.02  # p of the draws are uniform over [0, T), 3/4 of those land outside
    with pytest.raises(ValueError, match="prob_sampling"):
        sample_deme_timesteps(stages, 1, 4, prob_sampling=1.5)


def test_save_keeps_other_stage_folders(tmp_path):
    """Single-stage runs write only their own folder, so stages gathered from several runs coexist."""
    adapters = randomised_adapters("pixel")
    adapters.save_pretrained(tmp_path, stages=[0])
    adapters.save_pretrained(tmp_path, stages=[2])
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("stage")) == ["stage0", "stage2", "stages.json"]

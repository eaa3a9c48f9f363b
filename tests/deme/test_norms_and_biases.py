"""Per-stage norms and biases in DeMe's LoRA mode (`train_norms_and_biases`): training, files, exact merge."""

import json

import pytest
import torch
from diffusers import DDPMScheduler
from peft.utils import ModulesToSaveWrapper
from safetensors import safe_open

from diffusers_stages import StageLoraAdapters, TimestepStages, deme_training_step
from diffusers_stages.deme.adapters import LORA_WEIGHT_NAME
from diffusers_stages.deme.merging import StageDeltas, merge_stage_adapters
from diffusers_stages.deme.norms_and_biases import peft_supports_norms_and_biases
from diffusers_stages.testing import tiny_unet_2d, tiny_unet_2d_condition

RANK, ALPHA = 2, 6.0  # alpha != rank: the bias update is (alpha / r) b_k
WEIGHTS = [0.3, 0.9, 0.55]
TARGETS = ["to_q", "to_out.0", "conv1", "conv2"]  # SD's to_q has no bias; fewer layers than the default: fast

NEEDS_PEFT = pytest.mark.skipif(
    not peft_supports_norms_and_biases(),
    reason="train_norms_and_biases needs a newer PEFT (refused: tests/deme/test_config.py)",
)
pytestmark = NEEDS_PEFT


def make_unet(kind: str):
    return tiny_unet_2d(sample_size=8) if kind == "pixel" else tiny_unet_2d_condition(16)


def inputs(unet):
    g = torch.Generator().manual_seed(1)
    c, s = unet.config.in_channels, unet.config.sample_size
    kw = {} if unet.config.in_channels == 1 else {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g)}
    return torch.randn(2, c, s, s, generator=g), kw


def randomised(kind: str) -> StageLoraAdapters:
    """Stage adapters with random LoRA B, LoRA biases and norm copies per stage."""
    unet = make_unet(kind)
    adapters = StageLoraAdapters.attach(
        unet, TimestepStages.uniform(3), rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
        train_norms_and_biases=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return adapters


def norm_names(unet) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]


def reference_deltas(adapters: StageLoraAdapters, stage: int) -> dict[str, torch.Tensor]:
    """tau_k of the norms (n_k - n) and biases ((alpha / r) b_k), read off the live adapters, float64."""
    tau = {}
    for name, m in adapters.unet.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            for attr in ("weight", "bias"):
                copy, base = getattr(m.modules_to_save[f"stage{stage}"], attr), getattr(m.original_module, attr)
                tau[f"{name}.{attr}"] = copy.detach().double() - base.detach().double()
        elif hasattr(m, "lora_B") and m.lora_B[f"stage{stage}"].bias is not None:
            tau[f"{name}.bias"] = ALPHA / RANK * m.lora_B[f"stage{stage}"].bias.detach().double()
    return tau


@pytest.mark.parametrize("kind", ["pixel", "text"])
def test_merge_is_the_base_plus_the_weighted_stage_deltas(kind, tmp_path):
    adapters = randomised(kind)
    unet = adapters.unet
    assert len(list(adapters.norm_copies)) == len(norm_names(make_unet(kind))) > 0
    adapters.save_pretrained(tmp_path)
    base = make_unet(kind).state_dict()
    merged = merge_stage_adapters(make_unet(kind), tmp_path, WEIGHTS).state_dict()
    taus = [reference_deltas(adapters, k) for k in range(3)]
    assert any(n.endswith("norm1.weight") for n in taus[0]) and any(n.endswith("conv1.bias") for n in taus[0])
    for name in taus[0]:
        ref = base[name].double() + sum(w * tau[name] for w, tau in zip(WEIGHTS, taus))
        torch.testing.assert_close(merged[name].double(), ref, atol=1e-6, rtol=0)
        assert not torch.equal(merged[name], base[name])
    # a bias-less adapted layer (SD's attention to_q) gets no LoRA bias: the plain UNet has nothing to merge it into
    layers = [m for m in adapters.lora_layers]
    assert all((m.lora_B["stage0"].bias is None) == (m.get_base_layer().bias is None) for m in layers)
    assert kind == "pixel" or any(m.get_base_layer().bias is None for m in layers)

    # one stage at weight 1: the merged plain UNet computes what the adapted UNet computes with that stage active
    x, kw = inputs(unet)
    adapters.set_stage(1)
    single = merge_stage_adapters(make_unet(kind), tmp_path, [0.0, 1.0, 0.0])
    with torch.no_grad():
        torch.testing.assert_close(single(x, 500, **kw).sample, unet(x, 500, **kw).sample, atol=1e-5, rtol=1e-5)
        with adapters.disabled():
            base_out = unet(x, 500, **kw).sample
    assert (single(x, 500, **kw).sample - base_out).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:.*lora_bias=True.*")  # diffusers' own loader: PEFT warns on SD's bias-less to_q
def test_files_hold_the_norms_and_biases_and_load_back_also_in_stock_diffusers(tmp_path):
    adapters = randomised("text")
    adapters.save_pretrained(tmp_path)
    path = tmp_path / "stage2" / LORA_WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert "unet.down_blocks.0.resnets.0.norm1.weight" in keys and "unet.conv_norm_out.bias" in keys
    assert "unet.down_blocks.0.resnets.0.conv1.lora_B.bias" in keys
    assert meta["unet.lora_bias"] is True and "conv_norm_out" in meta["unet.modules_to_save"]

    x, kw = inputs(adapters.unet)
    reloaded = StageLoraAdapters.from_pretrained(make_unet("text"), tmp_path)
    stock = make_unet("text")
    stock.load_lora_adapter(
        str(tmp_path / "stage2"), weight_name=LORA_WEIGHT_NAME, adapter_name="s2", prefix="unet", use_safetensors=True
    )
    for ad in (adapters, reloaded):
        ad.set_stage(2)
    with torch.no_grad():
        expected = adapters.unet(x, 900, **kw).sample
        torch.testing.assert_close(reloaded.unet(x, 900, **kw).sample, expected, atol=0, rtol=0)
        torch.testing.assert_close(stock(x, 900, **kw).sample, expected, atol=1e-6, rtol=1e-6)


def test_a_training_step_updates_only_the_active_stages_copies():
    adapters = StageLoraAdapters.attach(
        make_unet("text"), TimestepStages.uniform(3), rank=2, target_modules=TARGETS, train_norms_and_biases=True
    )
    unet = adapters.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    params = adapters.parameters(1)
    assert any(p is m.modules_to_save["stage1"].weight for m in adapters.norm_copies for p in params)
    optimizer = torch.optim.SGD(params, lr=1.0)
    x0, kw = inputs(unet)
    g = torch.Generator().manual_seed(0)
    out = deme_training_step(unet, adapters, DDPMScheduler(), x0, 1, g, kw["encoder_hidden_states"], 0.0, True)
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".stage1." in n for n in changed)  # the base and the other stages are untouched
    assert any(".modules_to_save.stage1." in n for n in changed) and any("lora_B.stage1.bias" in n for n in changed)


def test_weighted_activation_and_mismatched_stages_are_refused(tmp_path):
    adapters = randomised("pixel")
    with pytest.raises(ValueError, match="one stage at weight 1"):
        adapters.set_weights([0.5, 0.5, 0.0])
    adapters.set_weights([0.0, 0.0, 0.0])  # the base norms
    assert all(not m.active_adapters for m in adapters.norm_copies)
    adapters.save_pretrained(tmp_path / "norms")
    plain = StageLoraAdapters.attach(
        make_unet("pixel"), TimestepStages.uniform(3), rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS
    )
    plain.save_pretrained(tmp_path / "plain", stages=[1])
    (tmp_path / "norms" / "stage1" / LORA_WEIGHT_NAME).write_bytes(
        (tmp_path / "plain" / "stage1" / LORA_WEIGHT_NAME).read_bytes()
    )
    with pytest.raises(ValueError, match="disagree on `lora_bias`"):
        merge_stage_adapters(make_unet("pixel"), tmp_path / "norms", WEIGHTS)


def test_ties_sees_the_norms_and_biases(tmp_path):
    randomised("pixel").save_pretrained(tmp_path)
    taus = StageDeltas.read(tmp_path).dense(make_unet("pixel"))
    assert "conv_norm_out.weight" in taus[0] and "down_blocks.0.resnets.0.conv1.bias" in taus[0]
    merged = merge_stage_adapters(make_unet("pixel"), tmp_path, WEIGHTS, merge_method="ties", ties_density=1.0)
    base = make_unet("pixel").state_dict()
    assert not torch.equal(merged.state_dict()["conv_norm_out.weight"], base["conv_norm_out.weight"])

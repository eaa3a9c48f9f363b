import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from diffusers_stages import TimestepStages
from diffusers_stages.models.profiling import count_macs, count_parameters
from diffusers_stages.tdc import DenoisingLossProxy
from diffusers_stages.tdc.pruning import PruningAction, SearchPolicy, flops_budgets, proxy_prune, prune_unet
from diffusers_stages.testing import tiny_unet_2d, tiny_unet_2d_condition
from diffusers_stages.training.objectives import DiscreteObjective


@pytest.fixture(scope="module")
def unet():
    torch.set_num_threads(1)
    return tiny_unet_2d(sample_size=8).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 700])


def test_flops_budgets_linear_ramp():
    N, k = 3, 0.4  # 4 groups, i = 0..N
    ref = [i / N + (N - i) / N * k for i in range(N + 1)]
    assert flops_budgets(4, k, "high_noise") == pytest.approx(ref)
    assert flops_budgets(4, k, "low_noise") == pytest.approx(ref[::-1])
    assert flops_budgets(1, k) == [1.0]
    with pytest.raises(ValueError, match="`k`"):
        flops_budgets(3, 0.0)
    with pytest.raises(ValueError, match="`full_size_at`"):
        flops_budgets(3, 0.5, "middle")


def test_no_change_reproduces_the_model(unet, inputs):
    pruned = prune_unet(unet)
    with torch.no_grad():
        torch.testing.assert_close(pruned(*inputs).sample, unet(*inputs).sample, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [
        {"block_out_channels": (16, 64, 64)},
        {"block_out_channels": (32, 32, 48)},
        {"remove_attention": [2, "mid"]},
        {"block_out_channels": (16, 32, 32), "remove_attention": [2]},
    ],
)
def test_pruned_model_is_smaller_valid_and_loadable(unet, inputs, change, tmp_path):
    pruned = prune_unet(unet, **change)
    assert type(pruned) is UNet2DModel
    widths = change.get("block_out_channels", unet.config.block_out_channels)
    assert tuple(pruned.config.block_out_channels) == tuple(widths)
    if 2 in change.get("remove_attention", []):
        assert pruned.config.down_block_types[2] == "DownBlock2D" and pruned.config.up_block_types[0] == "UpBlock2D"
    x, t = inputs
    assert count_macs(pruned, x[:1], t[:1]) < count_macs(unet, x[:1], t[:1])
    assert count_parameters(pruned) < count_parameters(unet)
    with torch.no_grad():
        out = pruned(x, t).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    # an ordinary diffusers model: the config alone rebuilds it, safetensors round-trip
    pruned.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = UNet2DModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, out, rtol=0, atol=0)


def test_pruned_model_runs_in_stock_pipeline(unet, tmp_path):
    pipe = DDPMPipeline(unet=prune_unet(unet, block_out_channels=(16, 32, 32)), scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path)
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_channel_selection_respects_groups(unet):
    pruned = prune_unet(unet, block_out_channels=(32, 32, 64))
    name = "down_blocks.1.resnets.0"
    w = unet.state_dict()[f"{name}.conv1.weight"]  # [64, 32, 3, 3], 8 groups of 8 inner channels
    # reference: in each GroupNorm group, the 4 inner channels with the largest conv1 L1 norm, in order
    score = w.abs().flatten(1).sum(1).view(8, 8)
    inner = (score.topk(4, dim=1).indices.sort(dim=1).values + torch.arange(8)[:, None] * 8).flatten()
    stream = (torch.arange(8)[:, None] * 8 + torch.arange(4)).flatten()  # level-1 stream: first 4 of each group
    new = pruned.state_dict()
    torch.testing.assert_close(new[f"{name}.conv1.weight"], w[inner])
    torch.testing.assert_close(new[f"{name}.norm2.weight"], unet.state_dict()[f"{name}.norm2.weight"][inner])
    torch.testing.assert_close(
        new[f"{name}.conv2.weight"], unet.state_dict()[f"{name}.conv2.weight"][:, inner][stream]
    )


def test_narrow_level0_keeps_time_features(unet):
    pruned = prune_unet(unet, block_out_channels=(16, 64, 64))
    t = torch.tensor([3, 250, 999])
    # freq_shift 0, 16 -> 8 frequencies: new frequency j is old frequency 2 j (cos half, then sin half)
    idx = torch.cat([torch.arange(8) * 2, 16 + torch.arange(8) * 2])
    torch.testing.assert_close(pruned.time_proj(t), unet.time_proj(t)[:, idx])
    torch.testing.assert_close(
        pruned.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight[:, idx], rtol=0, atol=0
    )
    assert pruned.time_embedding.linear_2.out_features == unet.time_embedding.linear_2.out_features


def test_bad_pruning_requests(unet):
    with pytest.raises(ValueError, match="block_out_channels"):
        prune_unet(unet, block_out_channels=(32, 128, 64))
    with pytest.raises(ValueError, match="multiples of 8"):
        prune_unet(unet, block_out_channels=(32, 60, 64))
    with pytest.raises(ValueError, match="remove_attention"):
        prune_unet(unet, remove_attention=[0])
    with pytest.raises(ValueError, match="UNet2DModel"):
        prune_unet(tiny_unet_2d_condition())


def test_loop_reaches_budget_and_keeps_best_by_proxy(unet, inputs):
    x, t = inputs
    example = (x[:1], t[:1])
    full = count_macs(unet, *example)
    scored = []

    def proxy(model):  # an arbitrary but deterministic score per architecture
        key = (
            tuple(model.config.block_out_channels),
            tuple(model.config.down_block_types),
            model.config.add_attention,
        )
        score = float(hash(key) % 1000)
        scored.append((model, score))
        return score

    out = proxy_prune(unet, 0.6 * full, proxy, example, progress=False)
    assert out.macs == count_macs(out.model, *example) <= 0.6 * full
    assert len(out.history) >= 1
    start = 0
    for rnd in out.history:
        scores = [c[2] for c in rnd.candidates]
        assert rnd.chosen == min(range(len(scores)), key=lambda i: (scores[i], rnd.candidates[i][1]))
        start += len(scores)
    # the returned model is the very object the proxy scored as the last round's choice
    last = out.history[-1]
    chosen_model = scored[start - len(last.candidates) + last.chosen][0]
    assert chosen_model is out.model and out.score == last.candidates[last.chosen][2]


def test_pluggable_policy_and_unreachable_budget(unet, inputs):
    x, t = inputs
    example = (x[:1], t[:1])

    def attention_only(model, history):
        return [PruningAction("attention", 2), PruningAction("attention", "mid")]

    full = count_macs(unet, *example)
    with pytest.raises(ValueError, match="unreachable"):
        proxy_prune(unet, 0.5 * full, lambda m: 0.0, example, policy=attention_only, progress=False)
    out = proxy_prune(unet, full - 1, lambda m: count_parameters(m), example, policy=attention_only, progress=False)
    assert len(out.history) == 1 and len(out.history[0].candidates) == 2
    assert SearchPolicy(attention=False)(unet, []) == [PruningAction("width", i, 0.25) for i in range(3)]


def test_denoising_loss_proxy_matches_reference(unet):
    sched = DDIMScheduler()
    objective = DiscreteObjective(sched)
    stages = TimestepStages([300])
    images = torch.rand(12, 1, 8, 8) * 2 - 1
    proxy = DenoisingLossProxy(objective, stages, 1, images[:8], images[8:], finetune_steps=0, seed=3)
    t = proxy.heldout_levels
    assert ((t >= 300) & (t < 1000)).all()
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * images[8:] + (1 - abar).sqrt() * proxy.heldout_noise
    with torch.no_grad():
        ref = ((unet(x_t, t).sample - proxy.heldout_noise) ** 2).mean()
    assert proxy(unet) == pytest.approx(float(ref), rel=1e-5)
    # a finetuning proxy trains the candidate in place and counts what it spent
    model = prune_unet(unet, block_out_channels=(16, 32, 32))
    before = [p.clone() for p in model.parameters()]
    tuned = DenoisingLossProxy(objective, stages, 0, images[:8], images[8:], finetune_steps=2, batch_size=4)
    tuned(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert tuned.macs_spent == (3 * 2 * 4 + 4) * count_macs(model, images[:1], torch.tensor([100]))

import textwrap

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

    class AttentionOnly:
        needs_reference_score = False

        def propose(self, model, history):
            return [PruningAction("attention", 2), PruningAction("attention", "mid")]

        def choose(self, candidates, macs, score):
            return 0

    attention_only = AttentionOnly()

    full = count_macs(unet, *example)
    with pytest.raises(ValueError, match="unreachable"):
        proxy_prune(unet, 0.5 * full, lambda m: 0.0, example, policy=attention_only, progress=False)
    out = proxy_prune(unet, full - 1, lambda m: count_parameters(m), example, policy=attention_only, progress=False)
    assert len(out.history) == 1 and len(out.history[0].candidates) == 2 and out.history[0].chosen == 0
    assert SearchPolicy(attention=False).propose(unet, []) == [PruningAction("width", i, 0.25) for i in range(3)]
    attention_only.choose = lambda candidates, macs, score: 2
    with pytest.raises(ValueError, match="candidate index"):
        proxy_prune(unet, full - 1, lambda m: 0.0, example, policy=attention_only, progress=False)
    with pytest.raises(ValueError, match="selection"):
        SearchPolicy(selection="random")


def test_cost_aware_policy_minimises_score_increase_per_mac_saved(unet, inputs):
    example = (inputs[0][:1], inputs[1][:1])
    full = count_macs(unet, *example)
    calls = []

    def proxy(model):  # the loss grows with the square root of the MACs saved: big savings are cheap per MAC
        macs = count_macs(model, *example)
        calls.append(macs)
        return 1.0 + 1e-4 * (full - macs) ** 0.5

    runs = {
        s: proxy_prune(unet, full - 1, proxy, example, SearchPolicy(selection=s), progress=False)
        for s in ("greedy", "cost_aware")
    }
    assert calls.count(full) == 1  # only the cost-aware run scores the starting model (a copy)
    for selection, out in runs.items():
        (rnd,) = out.history
        macs = [c[1] for c in rnd.candidates]
        increase = [max(c[2] - proxy(unet), 0.0) / (full - c[1]) for c in rnd.candidates]  # reference formula
        expected = (
            min(range(len(macs)), key=lambda i: (increase[i], macs[i]))
            if selection == "cost_aware"
            else min(range(len(macs)), key=lambda i: (rnd.candidates[i][2], macs[i]))
        )
        assert rnd.chosen == expected
    assert runs["cost_aware"].macs == min(c[1] for c in runs["cost_aware"].history[0].candidates)
    assert runs["greedy"].macs == max(c[1] for c in runs["greedy"].history[0].candidates)


def test_the_documented_language_model_policy_runs(unet, inputs):
    import re

    from diffusers_stages.tdc import PruningPolicy

    code = re.search(r"```py\n(.*?)```", PruningPolicy.__doc__, re.S).group(1)
    namespace = {}
    exec(textwrap.dedent(code), namespace)
    prompts = []

    def ask(prompt):  # a stand-in for a chat model: keep the candidate listed with the fewest MACs
        prompts.append(prompt)
        lines = [line for line in prompt.splitlines() if re.match(r"\d+: ", line)]
        return str(min(range(len(lines)), key=lambda i: int(lines[i].split(", ")[1].split()[0])))

    example = (inputs[0][:1], inputs[1][:1])
    full = count_macs(unet, *example)
    policy = namespace["LanguageModelPolicy"](ask)
    out = proxy_prune(unet, 0.9 * full, lambda m: float(count_parameters(m)), example, policy, progress=False)
    assert out.macs <= 0.9 * full and len(prompts) == len(out.history)
    assert all(r.chosen == min(range(len(r.candidates)), key=lambda i: r.candidates[i][1]) for r in out.history)


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


def _variant(**changes) -> UNet2DModel:
    """The tiny UNet's config with ``changes`` (random weights, seeded)."""
    config = {k: v for k, v in tiny_unet_2d(sample_size=8).config.items() if not k.startswith("_")}
    torch.manual_seed(1)
    return UNet2DModel.from_config({**config, **changes}).eval()


def _kept(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Which entries of the 1-D ``old`` the pruned ``new`` holds (random values are unique)."""
    return torch.tensor([int((old - v).abs().argmin()) for v in new])


def test_scale_shift_time_projection_keeps_each_channels_scale_and_shift(inputs):
    unet = _variant(resnet_time_scale_shift="scale_shift")  # the IDDPM time conditioning
    pruned = prune_unet(unet, block_out_channels=(16, 32, 48))
    old, new = unet.state_dict(), pruned.state_dict()
    narrowed = 0
    for name in new:
        if name.endswith("time_emb_proj.weight"):
            owner = name.removesuffix(".time_emb_proj.weight")
            kept = _kept(old[f"{owner}.conv1.bias"], new[f"{owner}.conv1.bias"])
            width = len(old[f"{owner}.conv1.bias"])
            rows = torch.cat([kept, kept + width])  # reference: [scale, shift] rows of the kept channels
            torch.testing.assert_close(new[name], old[name][rows], rtol=0, atol=0)
            torch.testing.assert_close(new[f"{owner}.time_emb_proj.bias"], old[f"{owner}.time_emb_proj.bias"][rows])
            narrowed += len(kept) < width
    assert narrowed > 0
    with torch.no_grad():
        assert pruned(*inputs).sample.shape == inputs[0].shape
        torch.testing.assert_close(prune_unet(unet)(*inputs).sample, unet(*inputs).sample, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fourier", "learned"])
def test_narrower_time_features_equal_the_original_without_them(kind, inputs):
    unet = _variant(time_embedding_type=kind, num_train_timesteps=1000)
    pruned = prune_unet(unet, block_out_channels=(16, 64, 64))
    table_old, table_new = unet.time_proj.weight, pruned.time_proj.weight
    kept = _kept(
        table_old.flatten() if kind == "fourier" else table_old[0],
        table_new.flatten() if kind == "fourier" else table_new[0],
    )
    # reference: the original with the removed features' linear_1 columns zeroed
    reference = UNet2DModel.from_config(unet.config)
    reference.load_state_dict(unet.state_dict())
    removed = torch.ones(table_old.shape[-1], dtype=torch.bool)
    removed[kept] = False
    columns = torch.cat([removed, removed]) if kind == "fourier" else removed
    with torch.no_grad():
        reference.time_embedding.linear_1.weight[:, columns] = 0
        t = torch.tensor([3, 500, 999])
        emb_ref = reference.time_embedding(reference.time_proj(t))
        torch.testing.assert_close(pruned.time_embedding(pruned.time_proj(t)), emb_ref, rtol=1e-5, atol=1e-6)
        assert pruned(*inputs).sample.shape == inputs[0].shape
    # the kept features are those of largest column norm
    norms = unet.time_embedding.linear_1.weight.abs().sum(0)
    norms = norms.view(2, -1).sum(0) if kind == "fourier" else norms
    assert set(kept.tolist()) == set(norms.topk(len(kept)).indices.tolist())

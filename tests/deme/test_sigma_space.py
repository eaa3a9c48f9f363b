"""DeMe on sigma-space bases (issue 18): an EDM-FDM multi-decoder model saved by the trainer is finetuned per stage
with its own objective (``lambda(sigma) |D - x0|^2``), merged, and reloaded; the discrete path keeps its numbers."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, EDMEulerScheduler
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from diffusers_stages import StageLoraAdapters, TimestepStages
from diffusers_stages.deme import deme_training_step
from diffusers_stages.deme.config import StageLoraConfig, StageMergeConfig
from diffusers_stages.deme.inputs import load_base_components
from diffusers_stages.deme.losses import sample_deme_levels
from diffusers_stages.deme.merge import merge_stages
from diffusers_stages.deme.training import train_stage_lora
from diffusers_stages.models import MultiDecoderUNet2DModel
from diffusers_stages.pipelines import StageAwareImagePipeline, load_pipeline
from diffusers_stages.schedulers import FDMEDMScheduler
from diffusers_stages.testing import tiny_unet_2d
from diffusers_stages.training import EDMObjective, TrainingConfig, train
from diffusers_stages.training.components import SIGMA_DISTRIBUTIONS

TARGETS = ["to_q", "to_v", "conv1"]


@pytest.fixture(scope="module")
def edm_fdm_base(tmp_path_factory):
    """A tiny 2-stage multi-decoder EDM-FDM pixel pipeline trained (2 steps) by the trainer, with its stages."""
    root = tmp_path_factory.mktemp("sigma")
    train(
        TrainingConfig(
            dataset_name="digits", resolution=8, max_train_samples=64, train_batch_size=8, block_out_channels=[16, 32],
            num_inference_steps=2, validation_steps=0, report_to="none", learning_rate=1e-3, max_train_steps=2,
            output_dir=str(root / "base"), model_type="multi_decoder", num_stages=2, noise_process="edm_fdm",
            stages_json=None,
        )
    )  # fmt: skip
    return root, root / "base"


@pytest.fixture(scope="module")
def deme_run(edm_fdm_base):
    root, base = edm_fdm_base
    common = dict(pretrained_model_name_or_path=str(base), dataset_name="digits", resolution=8)
    train_stage_lora(
        StageLoraConfig(
            **common, output_dir=str(root / "adapters"), train_batch_size=4, max_train_steps=2, num_stages=3,
            rank=2, target_modules=TARGETS, learning_rate=1e-2, consistency_loss=True, prob_sampling=0.3,
        )
    )  # fmt: skip
    merge_stages(
        StageMergeConfig(
            **common, adapters_dir=str(root / "adapters"), output_dir=str(root / "merged"), grid_search=True,
            grid_values=[0.5, 1.0], num_heldout=16,
        )
    )  # fmt: skip
    return base, root / "adapters", root / "merged"


def lora_delta(state: dict, name: str, shape: torch.Size, scaling: float) -> torch.Tensor:
    """``(alpha / r) B A`` of the adapted weight ``name`` (linear or conv LoRA)."""
    a, b = state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"]
    return scaling * (b.flatten(1) @ a.flatten(1)).view(shape)


def test_deme_lora_on_an_edm_fdm_multi_decoder_base_merges_and_samples(deme_run, tmp_path, monkeypatch):
    base, adapters_dir, merged = deme_run
    # the multi-decoder base's own stages are used (num_stages=3 is ignored: the base has 2 decoders)
    assert TimestepStages.from_pretrained(adapters_dir).boundaries == TimestepStages.from_pretrained(base).boundaries
    record = json.loads((merged / "deme_merge.json").read_text())
    weights = record["merge_weights"]
    assert len(weights) == 2 and "grid search" in record["weight_source"]
    theta = MultiDecoderUNet2DModel.from_pretrained(base / "unet").state_dict()
    states = [load_file(next((adapters_dir / f"stage{k}").glob("*.safetensors"))) for k in range(2)]
    assert any(".decoders.1." in key for key in states[0]) and any(".down_blocks." in key for key in states[0])
    pipe = StageAwareImagePipeline.from_pretrained(merged)
    assert isinstance(pipe.unet, MultiDecoderUNet2DModel) and isinstance(pipe.scheduler, FDMEDMScheduler)
    adapted = {key.removeprefix("unet.").removesuffix(".lora_A.weight") for key in states[0] if ".lora_A." in key}
    for name in adapted:
        w = theta[f"{name}.weight"]
        expected = w + sum(wk * lora_delta(s, name, w.shape, record["lora_scaling"]) for wk, s in zip(weights, states))
        torch.testing.assert_close(pipe.unet.state_dict()[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(pipe.unet.state_dict()[f"{name}.weight"], w)  # the merge changed something
    assert type(load_pipeline(merged).unet) is MultiDecoderUNet2DModel
    images = pipe(batch_size=2, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (2, 1, 8, 8) and bool(torch.isfinite(images.images).all())
    snippet = ModelCard.load(merged / "README.md").text.split("```python\n")[1].split("```")[0]
    assert "trust_remote_code=True" in snippet  # our pipeline class: stock diffusers alone cannot load it
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})  # the card's usage snippet runs as written
    assert (tmp_path / "sample.png").is_file()


def sigma_objective(base):
    scheduler = FDMEDMScheduler.from_pretrained(base, subfolder="scheduler")
    return EDMObjective(scheduler, SIGMA_DISTRIBUTIONS[scheduler.config.variant]())


def test_sigma_space_deme_loss_is_the_base_objective_with_fresh_adapters(edm_fdm_base):
    _, base = edm_fdm_base
    objective = sigma_objective(base)
    unet = load_base_components(str(base)).unet
    stages = TimestepStages.from_pretrained(base)
    adapters = StageLoraAdapters.attach(unet, stages, rank=2, target_modules=TARGETS)  # B = 0: a no-op
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = deme_training_step(
        unet, adapters, objective.scheduler, x0, 1, torch.Generator().manual_seed(3), prob_sampling=0.3,
        consistency_loss=True,
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    levels = sample_deme_levels(objective, stages, 1, 6, 0.3, g)
    noise = randn_tensor(x0.shape, generator=g, dtype=torch.float32)
    torch.testing.assert_close(out.timesteps, levels)
    with torch.no_grad(), adapters.disabled():
        reference = objective.loss(unet, x0, noise, levels).mean()
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    assert out.consistency_loss.item() == 0.0 and out.loss.item() > 0


def test_sigma_draws_of_a_stage_lie_in_its_sigma_range(edm_fdm_base):
    _, base = edm_fdm_base
    objective = sigma_objective(base)
    stages = TimestepStages.uniform(3, 1000)
    edges = [objective.scheduler.timestep_to_sigma(torch.tensor(float(b))).item() for b in stages.boundaries]
    bounds = [0.0, *edges, float("inf")]
    for k in range(3):
        sigma = sample_deme_levels(objective, stages, k, 2000, 0.0, torch.Generator().manual_seed(k))
        assert bool(((sigma >= bounds[k] * (1 - 1e-5)) & (sigma <= bounds[k + 1] * (1 + 1e-5))).all()), k
        mixed = sample_deme_levels(objective, stages, k, 2000, 0.5, torch.Generator().manual_seed(k))
        outside = float((objective.stage_of(stages, mixed) != k).float().mean())
        assert abs(outside - 0.5 * (1 - float(objective.stage_weights(stages)[k]))) < 0.04  # p = 0.5 from anywhere


def test_antithetic_timesteps_are_refused_in_sigma_space(edm_fdm_base):
    _, base = edm_fdm_base
    unet = load_base_components(str(base)).unet
    adapters = StageLoraAdapters.attach(unet, TimestepStages.from_pretrained(base), rank=2, target_modules=TARGETS)
    with pytest.raises(ValueError, match="antithetic_timesteps"):
        deme_training_step(
            unet, adapters, sigma_objective(base), torch.zeros(2, 1, 8, 8), 0, torch.Generator(),
            antithetic_timesteps=True,
        )  # fmt: skip


def test_an_unsupported_scheduler_class_is_refused(tmp_path):
    DDPMPipeline(unet=tiny_unet_2d(sample_size=8), scheduler=EDMEulerScheduler()).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="neither an FDM scheduler nor a DDPM-family scheduler"):
        load_base_components(str(tmp_path / "b"))


# the DeMe step's numbers before the objective interface (computed with the previous code on this base)
PINNED = {
    ("epsilon", False): ([1.0488104820251465, 1.0448118448257446, 0.003998606465756893], [981, 643, 514, 587]),
    ("epsilon", True): ([1.16475248336792, 1.1609673500061035, 0.003785148961469531], [48, 737, 667, 951]),
    ("v_prediction", False): ([1.2197381258010864, 1.2157394886016846, 0.003998606465756893], [981, 643, 514, 587]),
    ("v_prediction", True): ([1.1647100448608398, 1.1609249114990234, 0.003785148961469531], [48, 737, 667, 951]),
}


@pytest.mark.parametrize("prediction_type,antithetic", list(PINNED))
def test_the_discrete_deme_step_keeps_its_numbers(prediction_type, antithetic):
    unet = tiny_unet_2d(sample_size=8)
    adapters = StageLoraAdapters.attach(unet, TimestepStages.uniform(2, 1000), rank=2, target_modules=TARGETS)
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=g)
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = deme_training_step(
        unet, adapters, DDPMScheduler(prediction_type=prediction_type), x0, 1, torch.Generator().manual_seed(3),
        prob_sampling=0.3, consistency_loss=True, antithetic_timesteps=antithetic,
    )  # fmt: skip
    losses, timesteps = PINNED[prediction_type, antithetic]
    assert out.timesteps.tolist() == timesteps
    got = [out.loss.item(), out.denoising_loss.item(), out.consistency_loss.item()]
    # float32 reductions differ in the last bits across CPUs and thread counts (2e-6 seen); a changed formula moves far more
    torch.testing.assert_close(torch.tensor(got), torch.tensor(losses), rtol=1e-5, atol=0)


def test_full_deme_finetuning_on_a_sigma_space_base_merges_its_task_vectors(edm_fdm_base, tmp_path):
    from diffusers_stages.deme.task_vectors import TASK_VECTOR_WEIGHT_NAME

    _, base = edm_fdm_base
    common = dict(pretrained_model_name_or_path=str(base), dataset_name="digits", resolution=8)
    train_stage_lora(
        StageLoraConfig(
            **common, output_dir=str(tmp_path / "full"), train_batch_size=4, max_train_steps=1, learning_rate=1e-3,
            consistency_loss=True, finetune="full", task_vector_dtype="fp32",
        )
    )  # fmt: skip
    weights = [0.5, 1.0]
    merge_stages(
        StageMergeConfig(
            **common, adapters_dir=str(tmp_path / "full"), output_dir=str(tmp_path / "m"), merge_weights=weights
        )
    )
    merged = load_pipeline(tmp_path / "m").unet
    assert isinstance(merged, MultiDecoderUNet2DModel)
    theta = MultiDecoderUNet2DModel.from_pretrained(base / "unet").state_dict()
    taus = [load_file(tmp_path / "full" / f"stage{k}" / TASK_VECTOR_WEIGHT_NAME) for k in range(2)]
    name = "decoders.1.conv_out.weight"
    expected = theta[name] + sum(w * tau[name] for w, tau in zip(weights, taus))
    assert not torch.equal(expected, theta[name])
    torch.testing.assert_close(merged.state_dict()[name], expected, rtol=1e-5, atol=1e-6)


def test_before_merge_sampling_switches_stage_adapters_on_the_sigma_grid(deme_run):
    from diffusers_stages.pipelines.stage_switching import switch_stage_experts

    base, adapters_dir, _ = deme_run
    pipe = load_pipeline(base)
    adapters = StageLoraAdapters.from_pretrained(pipe.unet, adapters_dir)
    seen = []
    with switch_stage_experts(pipe.unet, adapters) as switcher:
        activate = switcher.activate
        switcher.activate = lambda k, scale=1.0: (seen.append(k), activate(k, scale))[1]
        out = pipe(batch_size=2, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0))
    boundary = adapters.stages.boundaries[0]
    timesteps = pipe.scheduler.timesteps[: len(seen)]  # Heun: the index-space timestep of each UNet call
    assert seen == [int(t >= boundary) for t in timesteps] and seen[0] == 1 and seen[-1] == 0
    assert bool(torch.isfinite(out.images).all())

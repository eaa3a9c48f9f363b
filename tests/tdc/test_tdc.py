import json

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_stages import StageExpertsUNet, TimestepStages
from diffusers_stages.clustering import gradient_clustering
from diffusers_stages.configs import parse_config
from diffusers_stages.data import dataset_to_tensor, load_image_dataset
from diffusers_stages.models.profiling import count_macs
from diffusers_stages.pipelines import StageAwareImagePipeline
from diffusers_stages.tdc import TDCConfig, run_tdc
from diffusers_stages.tdc.pruning import flops_budgets

TINY = dict(
    dataset_name="digits",
    resolution=8,
    block_out_channels=[16, 32, 32],
    max_train_steps=12,
    train_batch_size=16,
    num_groups=2,
    grouping_grid_size=6,
    grouping_images=16,
    proxy_finetune_steps=1,
    proxy_heldout_images=16,
    num_inference_steps=2,
    report_to="none",
    checkpointing_steps=1000,
    prune_k=0.5,
)


def test_tdc_end_to_end_experts_load_into_stage_aware_pipeline(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "tdc"
    config = TDCConfig(**TINY, output_dir=str(out), grouping_difficulty="snr", difficulty_weight=0.9)
    metrics = run_tdc(config)
    info = json.loads((out / "tdc.json").read_text())
    assert metrics["tdc"] == info and info["phase1_steps"] == 6

    stages = TimestepStages.from_pretrained(out)
    assert stages.num_stages == 2 and stages.config.method == "gradient_difficulty"
    assert stages.boundaries == info["stage_boundaries"]
    # the grouping is the gradient clustering of the phase-1 model with the configured (the paper's SNR) difficulty
    phase1 = StageAwareImagePipeline.from_pretrained(out / "phase1")
    images = dataset_to_tensor(load_image_dataset("digits", resolution=8), resolution=8, channels=1)
    train_images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))[16:]]
    options = dict(noise_schedule=phase1.scheduler, grid_size=6, difficulty_weight=0.9, num_images=16, progress=False)
    grouped = {d: gradient_clustering(phase1.unet, train_images, 2, difficulty=d, **options) for d in ("snr", "loss")}
    assert stages.boundaries == grouped["snr"].stages.boundaries != grouped["loss"].stages.boundaries

    pipe = StageAwareImagePipeline.from_pretrained(out)
    assert isinstance(pipe.unet, StageExpertsUNet)
    assert list(pipe.unet.config.stage_boundaries) == stages.boundaries
    # each expert is an ordinary UNet2DModel within its MAC budget (full size at low noise)
    full = UNet2DModel.from_pretrained(out / "phase1", subfolder="unet")
    x, t = torch.zeros(1, 1, 8, 8), torch.tensor([500])
    full_macs = count_macs(full, x, t)
    for expert, budget in zip(pipe.unet.experts, flops_budgets(2, 0.5, "low_noise")):
        assert isinstance(expert, UNet2DModel)
        assert count_macs(expert, x, t) <= budget * full_macs
    assert count_macs(pipe.unet.experts[1], x, t) < full_macs  # the high-noise expert was really pruned
    # each expert is its group's finetune: the phase-2 output of that group, weight for weight
    for k, expert in enumerate(pipe.unet.experts):
        trained = UNet2DModel.from_pretrained(out / "phase2" / f"group_{k}", subfolder="unet")
        for a, b in zip(expert.state_dict().values(), trained.state_dict().values()):
            assert torch.equal(a, b)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_tdc_arguments_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="`noise_process`"):
        TDCConfig(noise_process="edm")
    with pytest.raises(ValueError, match="`phase1_fraction`"):
        TDCConfig(phase1_fraction=1.0)
    with pytest.raises(SystemExit):  # the script's command line exits with the config's message
        parse_config(TDCConfig, ["--num_groups", "0"])

import json

import pytest
from diffusers import DDPMScheduler
from PIL import Image

from diffusers_stages import TimestepStages
from diffusers_stages.cli import main
from diffusers_stages.testing import tiny_unet_2d, tiny_vae


def test_cluster_optimal_denoiser_on_digits(tmp_path):
    out = tmp_path / "od"
    argv = ["cluster", "--dataset", "digits", "--num_stages", "3", "--grid_size", "40", "--num_samples", "8"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    stages = TimestepStages.from_pretrained(out)
    assert stages.num_stages == 3 and stages.config.method == "optimal_denoiser"
    report = json.loads((out / "clustering.json").read_text())
    assert report["boundaries"] == stages.boundaries and len(report["curves"]["S0"]) == 40
    assert report["num_samples_in_dataset"] == 1797
    assert (out / "clustering.png").stat().st_size > 10_000
    assert Image.open(out / "clustering.png").size[0] > 1000  # curves and matrix side by side


def test_cluster_snr_with_a_scheduler_config(tmp_path):
    DDPMScheduler(num_train_timesteps=500).save_config(tmp_path / "sched")
    out = tmp_path / "snr"
    argv = ["cluster", "--method", "snr", "--num_stages", "4", "--scheduler_config", str(tmp_path / "sched")]
    assert main([*argv, "--output_dir", str(out)]) == 0
    stages = TimestepStages.from_pretrained(out)
    assert stages.num_train_timesteps == 500 and stages.num_stages == 4 and stages.config.method == "snr"
    assert (out / "clustering.png").exists()


@pytest.mark.usefixtures("single_thread")
def test_cluster_gradient_with_a_saved_unet(tmp_path):
    tiny_unet_2d(sample_size=8, block_out_channels=(8, 16), attention=False).save_pretrained(tmp_path / "unet")
    out = tmp_path / "grad"
    argv = ["cluster", "--method", "gradient", "--num_stages", "2", "--grid_size", "4", "--max_samples", "4"]
    assert main([*argv, "--model", str(tmp_path / "unet"), "--output_dir", str(out)]) == 0
    assert TimestepStages.from_pretrained(out).config.method == "gradient"


def test_cluster_rejects_bad_input(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    Image.new("L", (10, 10)).save(folder / "b.png")
    with pytest.raises(ValueError, match="mixed sizes"):
        main(["cluster", "--dataset", str(folder), "--output_dir", str(tmp_path / "o1")])
    with pytest.raises(ValueError, match="num_stages"):
        main(["cluster", "--num_stages", "0", "--output_dir", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="num_stages"):
        main(["cluster", "--num_stages", "11", "--grid_size", "10", "--output_dir", str(tmp_path / "o3")])
    with pytest.raises(ValueError, match="--model"):
        main(["cluster", "--method", "gradient", "--max_samples", "2", "--output_dir", str(tmp_path / "o4")])
    assert not (tmp_path / "o2").exists()


def test_cluster_vae_latents(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "latents"
    argv = [
        "cluster",
        "--dataset",
        "digits",
        "--resolution",
        "16",
        "--max_samples",
        "40",
        "--vae",
        str(tmp_path / "vae"),
    ]
    argv += ["--num_stages", "2", "--grid_size", "10", "--num_samples", "4", "--data_range", "4.0"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    report = json.loads((out / "clustering.json").read_text())
    assert report["num_samples_in_dataset"] == 40 and len(report["curves"]["S0"]) == 10
    assert TimestepStages.from_pretrained(out).num_stages == 2

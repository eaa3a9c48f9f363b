import json

import pytest
from diffusers import DDPMScheduler
from PIL import Image

from diffusers_stages import TimestepStages
from diffusers_stages.cli import CLUSTER_METHODS, main
from diffusers_stages.clustering import CLUSTERING_METHODS
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
@pytest.mark.parametrize("method, extra", [("gradient", []), ("gradient_difficulty", ["--difficulty", "snr"])])
def test_cluster_gradient_with_a_saved_unet(tmp_path, method, extra):
    tiny_unet_2d(sample_size=8, block_out_channels=(8, 16), attention=False).save_pretrained(tmp_path / "unet")
    out = tmp_path / "grad"
    argv = ["cluster", "--method", method, "--num_stages", "2", "--grid_size", "4", "--max_samples", "4", *extra]
    assert main([*argv, "--model", str(tmp_path / "unet"), "--output_dir", str(out)]) == 0
    assert TimestepStages.from_pretrained(out).config.method == method


def test_cli_method_choices_are_the_library_methods():
    assert set(CLUSTER_METHODS) == set(CLUSTERING_METHODS)


def test_cluster_pixel_range_and_space_flags(tmp_path):
    argv = [
        "cluster",
        "--max_samples",
        "200",
        "--grid_size",
        "20",
        "--num_samples",
        "8",
        "--boundary_rule",
        "threshold",
    ]
    main([*argv, "--output_dir", str(tmp_path / "a"), "--pixel_range", "[-1, 1]", "--alpha", "0.8"])
    main([*argv, "--output_dir", str(tmp_path / "b"), "--space", "epsilon", "--alpha", "0.95"])
    a, b = (json.loads((tmp_path / x / "clustering.json").read_text()) for x in "ab")
    assert a["curves"]["S1"] != b["curves"]["S1"]


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

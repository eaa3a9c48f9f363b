"""Bad input is refused before the first training step; silent wrong results are gone (RGB data, NaN loss, a
pretrained scheduler of another length)."""

import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffusers_stages.training import TrainingConfig, train
from diffusers_stages.training.objectives import EDMObjective

TINY = dict(
    dataset_name="digits",
    resolution=8,
    max_train_samples=16,
    train_batch_size=8,
    block_out_channels=[8, 16],
    num_inference_steps=2,
    validation_steps=0,
    report_to="none",
    noise_process="ddpm",
    max_train_steps=1,
)


def config(tmp_path, **fields) -> TrainingConfig:
    return TrainingConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **fields})


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "train_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        train(config(tmp_path))
    train(config(tmp_path, overwrite_output_dir=True, checkpointing_steps=5))
    assert (out / "notes.txt").read_text() == "mine"  # never deleted
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the new run's, the old is gone
    assert json.loads((out / "checkpoint-1" / "train_state.json").read_text())["step"] == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        train(config(tmp_path, output_dir=str(tmp_path / "file")))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(resolution=9), "`resolution` must be a multiple of 2"),
        (dict(resolution=10, block_out_channels=[8, 8, 16]), "multiple of 4"),
        (dict(train_data_dir="/nonexistent/images"), "`train_data_dir`"),
        (dict(stages_json="/nonexistent/stages.json"), "`stages_json`"),
    ],
    ids=["resolution-odd", "resolution-3-levels", "missing-train_data_dir", "missing-stages_json"],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        train(config(tmp_path, **fields))
    assert not (tmp_path / "run").exists()


def test_rgb_data_trains_an_rgb_model(tmp_path, caplog):
    data = tmp_path / "images"
    data.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 255 - 30 * i, 0)).save(data / f"{i}.png")
    with caplog.at_level("INFO"):
        train(config(tmp_path, train_data_dir=str(data), train_batch_size=4))
    assert UNet2DModel.from_pretrained(tmp_path / "run", subfolder="unet").config.in_channels == 3
    assert "RGB: training a 3-channel model" in caplog.text
    train(
        config(tmp_path, train_data_dir=str(data), train_batch_size=4, output_dir=str(tmp_path / "g"), num_channels=1)
    )
    assert UNet2DModel.from_pretrained(tmp_path / "g", subfolder="unet").config.in_channels == 1


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    loss = EDMObjective.loss

    def nan_from_step_3(self, *args, **kwargs):
        out = loss(self, *args, **kwargs)
        nan_from_step_3.calls += 1
        return out * float("nan") if nan_from_step_3.calls >= 3 else out

    nan_from_step_3.calls = 0
    monkeypatch.setattr(EDMObjective, "loss", nan_from_step_3)
    with pytest.raises(FloatingPointError, match="non-finite.*step 3.*checkpoint-2"):
        train(config(tmp_path, noise_process="edm", max_train_steps=4, checkpointing_steps=2))
    out = tmp_path / "run"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"] and not (out / "model_index.json").exists()


def test_a_pretrained_scheduler_of_500_timesteps_trains_unified(tmp_path):
    base = tmp_path / "base"
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=500)).save_pretrained(base)
    train(config(tmp_path, pretrained_model_name_or_path=str(base)))
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert stages["num_train_timesteps"] == 500 and torch.isfinite(torch.tensor(0.0))

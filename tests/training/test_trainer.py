import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from safetensors.torch import load_file

from diffusers_stages import TimestepStages
from diffusers_stages.models import MultiDecoderUNet2DModel
from diffusers_stages.pipelines import StageAwareImagePipeline
from diffusers_stages.testing import tiny_stable_diffusion_pipeline
from diffusers_stages.training import TrainingConfig, train
from tests.conftest import BAD_TOKEN

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    dataset_name="digits",
    resolution=8,
    max_train_samples=64,
    train_batch_size=8,
    block_out_channels=[16, 32],
    num_inference_steps=2,
    validation_steps=0,
    report_to="none",
    learning_rate=1e-3,
)


def tiny_config(tmp_path, steps=2, name="run", **fields) -> TrainingConfig:
    """A few-seconds run on 64 embedded digits at 8x8."""
    return TrainingConfig(**{**TINY, "max_train_steps": steps, "output_dir": str(tmp_path / name), **fields})


def run(tmp_path, steps=2, name="run", **fields):
    return train(tiny_config(tmp_path, steps, name, **fields)), tmp_path / name


def unet_weights(folder):
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


@pytest.mark.parametrize(
    "fields",
    [
        dict(model_type="unified", noise_process="ddpm"),
        dict(model_type="unified", noise_process="fdm", prediction_type="v_prediction"),
        dict(model_type="unified", noise_process="edm"),
        dict(
            model_type="multi_decoder", num_stages=2, noise_process="edm_fdm", decoder_block_out_channels="16,32;8,16"
        ),
        dict(model_type="multi_decoder", num_stages=3, noise_process="fdm", stage_sampling="stage_per_sample"),
        dict(model_type="unified", noise_process="vp_fdm"),
        dict(
            model_type="multi_decoder", num_stages=2, noise_process="ve_fdm", stage_sampling="stage_per_batch_uniform"
        ),
    ],
    ids=["ddpm", "fdm-v", "edm", "multi-edm_fdm-tailored", "multi-fdm-per_sample", "vp_fdm", "multi-ve_fdm-uniform"],
)
def test_each_configuration_trains_and_saves_a_loadable_pipeline(tmp_path, fields):
    metrics, out = run(tmp_path, **fields)
    assert (out / "model_index.json").exists() and (out / "samples.png").exists()
    assert (out / "README.md").read_text().startswith("---")  # model card with metadata
    stages = TimestepStages.from_pretrained(out)
    pipe = StageAwareImagePipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    if fields["model_type"] == "multi_decoder":
        assert type(pipe.unet).__name__ == "MultiDecoderUNet2DModel" and pipe.unet.num_stages == stages.num_stages
    images = pipe(
        batch_size=2, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    saved = json.loads((out / "metrics.json").read_text())
    assert metrics["max_train_steps"] == 2 and saved["noise_process"] == fields["noise_process"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    fields = dict(
        model_type="multi_decoder",
        num_stages=2,
        noise_process="edm_fdm",
        use_ema=True,
        fdm_warmup_steps=4,
        checkpointing_steps=3,
        max_train_samples=16,  # 2 batches/epoch
    )
    _, straight = run(tmp_path, steps=6, name="straight", **fields)
    _, resumed = run(tmp_path, steps=3, name="resumed", **fields)
    state = json.loads((resumed / "checkpoint-3" / "train_state.json").read_text())
    assert state["step"] == 3 and state["fdm_warmup"]
    _, resumed = run(tmp_path, steps=6, name="resumed", resume_from_checkpoint="latest", **fields)
    a, b = unet_weights(straight), unet_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    at_3 = load_file(str(resumed / "checkpoint-3" / "model.safetensors"))
    at_6 = load_file(str(resumed / "checkpoint-6" / "model.safetensors"))
    assert any(not torch.equal(at_3[k], at_6[k]) for k in at_3)  # steps 4..6 did train
    # the EMA is diffusers' `EMAModel.save_pretrained` folder: a plain model of the trained class (the final EMA
    # weights) whose config holds the EMA state
    ema_model = MultiDecoderUNet2DModel.from_pretrained(resumed / "checkpoint-6" / "unet_ema")
    ema_weights = ema_model.state_dict()
    assert ema_weights.keys() == b.keys() and all(torch.equal(ema_weights[k], b[k]) for k in b)
    assert ema_model.config["optimization_step"] == 6 and ema_model.config["decay"] == TrainingConfig.ema_decay


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="diffusers_stages.training.loop"):
        metrics, out = run(tmp_path, steps=1, resume_from_checkpoint="latest")
    assert metrics["max_train_steps"] == 1 and (out / "checkpoint-1").is_dir()
    assert "no checkpoint in" in caplog.text and "starting a new run" in caplog.text


def test_push_to_hub_creates_the_repo_first_named_after_the_output_folder(tmp_path, fake_hub):
    _, hub = fake_hub
    with pytest.raises(HfHubHTTPError, match="401"):
        run(tmp_path, steps=1, name="my-run", push_to_hub=True, hub_token=BAD_TOKEN)
    assert not (tmp_path / "my-run").exists()  # failed before anything was loaded or written
    run(tmp_path, steps=1, name="my-run", push_to_hub=True, hub_token="hf_fake")
    assert {r["name"] for r in hub.repos} == {"my-run"}  # created at the start (and again, exist_ok, at the push)
    assert {"README.md", "model_index.json", "stages.json"} <= set(hub.store)
    assert not any(f.startswith("checkpoint-") for f in hub.store)


def test_corrupt_and_mismatched_checkpoints_are_rejected(tmp_path):
    fields = dict(model_type="unified", noise_process="edm", checkpointing_steps=1)
    _, out = run(tmp_path, steps=1, **fields)
    with pytest.raises(ValueError, match="different run"):
        run(tmp_path, model_type="multi_decoder", num_stages=2, noise_process="edm", resume_from_checkpoint="latest")
    for f in (out / "checkpoint-1").glob("model*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        run(tmp_path, resume_from_checkpoint="latest", **fields)
    (out / "checkpoint-1" / "train_state.json").unlink()
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        run(tmp_path, resume_from_checkpoint=str(out / "checkpoint-1"), **fields)
    with pytest.raises(ValueError, match="not a checkpoint"):
        run(tmp_path, resume_from_checkpoint=str(tmp_path / "nope"), **fields)


def test_stages_that_do_not_fit_fail_before_training(tmp_path):
    stages_dir = tmp_path / "stages"
    TimestepStages([100], num_train_timesteps=500).save_pretrained(stages_dir)
    with pytest.raises(ValueError, match="cover 500 training timesteps"):
        run(tmp_path, model_type="multi_decoder", stages_json=str(stages_dir))
    TimestepStages([100], num_train_timesteps=1000).save_pretrained(stages_dir)
    with pytest.raises(ValueError, match="gives 3 decoders but there are 2 stages"):
        run(
            tmp_path,
            model_type="multi_decoder",
            stages_json=str(stages_dir),
            noise_process="ddpm",
            decoder_block_out_channels="16,32;16,32;8,16",
        )
    assert not (tmp_path / "run").exists()  # nothing was written


def test_stable_diffusion_latents_multi_decoder(tmp_path):
    tiny_stable_diffusion_pipeline().save_pretrained(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"noise pattern {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    config = TrainingConfig(
        pretrained_model_name_or_path=str(tmp_path / "base"),
        train_data_dir=str(data),
        resolution=64,
        train_batch_size=2,
        max_train_steps=2,
        model_type="multi_decoder",
        num_stages=2,
        noise_process="ddpm",
        num_inference_steps=2,
        validation_steps=0,
        report_to="none",
        output_dir=str(tmp_path / "out"),
    )
    train(config)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.unet).__name__ == "MultiDecoderUNet2DConditionModel"
    pipe.set_progress_bar_config(disable=True)
    assert pipe("noise", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def _flags(fields: dict) -> list[str]:
    """The command line of ``fields`` (the script's flags are the config's field names)."""
    argv = []
    for k, v in fields.items():
        argv += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
    return argv


def test_accelerate_launch_script(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "training" / "train_multistage.py"),
        *_flags({**TINY, "max_train_steps": 2, "output_dir": tmp_path / "out", "model_type": "multi_decoder"}),
        *["--num_stages", "2"],
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, whatever is installed
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=300, env=env)
    assert (tmp_path / "out" / "model_index.json").exists() and (tmp_path / "out" / "checkpoint-2").is_dir()


def test_finetune_from_an_own_pipeline_folder(tmp_path):
    from diffusers_stages.pipelines import load_pipeline

    _, first = run(tmp_path, steps=1, name="first", model_type="unified", noise_process="edm")
    assert type(load_pipeline(first)).__name__ == "StageAwareImagePipeline"
    _, second = run(
        tmp_path,
        steps=1,
        name="second",
        pretrained_model_name_or_path=str(first),
        model_type="multi_decoder",
        num_stages=2,
        noise_process="edm",
    )
    assert type(load_pipeline(second).unet).__name__ == "MultiDecoderUNet2DModel"


def test_model_card_snippet_loads_the_output(tmp_path, monkeypatch):
    metrics, out = run(tmp_path, steps=1, model_type="multi_decoder", num_stages=2, noise_process="edm")
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and "diffusers-training" in card.data.tags
    assert "![" in card.text and "(./samples.png)" in card.text and (out / "samples.png").is_file()
    assert "| 1 | [" in card.text and "https://github.com/" not in card.text
    snippet = card.text.split("```python\n")[1].split("```")[0]
    assert "StageAwareImagePipeline" in snippet and str(out) in snippet
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    assert (tmp_path / "sample.png").is_file()


def test_model_card_license_is_the_base_models(tmp_path):
    from diffusers_stages.hub import base_model_license

    base = tmp_path / "base"
    base.mkdir()
    assert base_model_license(None) == base_model_license(str(base)) == "apache-2.0"
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# base\n")
    assert base_model_license(str(base)) == "creativeml-openrail-m"

"""`StageAwareImagePipeline`: stock schedulers whose `step` takes no `generator`, bad inputs, and loading as users do."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import diffusers
import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DEISMultistepScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from packaging import version

from diffusers_stages import StageAwareImagePipeline, StageLoraAdapters, TimestepStages
from diffusers_stages.pipelines.stage_experts import custom_code_lock
from diffusers_stages.testing import tiny_unet_2d

STAGES = TimestepStages([500])


def lora_pixel_pipeline(scheduler):
    unet = tiny_unet_2d().eval()
    adapters = StageLoraAdapters.attach(unet, STAGES, rank=4, target_modules=["to_q", "to_v"])
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    pipe = StageAwareImagePipeline(unet=unet, scheduler=scheduler)
    pipe.load_stage_adapters(adapters)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "scheduler_class",
    [HeunDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler, LMSDiscreteScheduler, DEISMultistepScheduler],
)
@torch.no_grad()
def test_schedulers_without_a_generator_argument(scheduler_class):
    pipe = lora_pixel_pipeline(scheduler_class(num_train_timesteps=1000))
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(int(args[1])))
    try:
        out = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt").images
    finally:
        handle.remove()
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    pipe.scheduler.set_timesteps(4)
    assert calls == [int(t) for t in pipe.scheduler.timesteps]  # one model call per scheduler timestep


def test_bad_inputs_give_clear_errors():
    pipe = lora_pixel_pipeline(DDPMScheduler())
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(batch_size=1, num_inference_steps=0)


LOADER = textwrap.dedent(
    """
    import sys, json, numpy as np, torch
    from diffusers import DDPMPipeline, DiffusionPipeline
    folder, out = sys.argv[1], sys.argv[2]
    assert "diffusers_stages" not in sys.modules
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    np.save(out, images)
    try:
        DDPMPipeline.from_pretrained(folder)
        stock = "loaded"
    except ValueError as error:
        stock = str(error)
    from diffusers_stages import StageAwareImagePipeline
    again = StageAwareImagePipeline.from_pretrained(folder)
    print(json.dumps({"class": type(pipe).__name__, "stock": stock, "ours": type(again).__name__,
                      "adapters": again.stage_adapters is not None}))
    """
)


def test_saved_folder_loads_with_diffusion_pipeline_in_a_fresh_process(tmp_path):
    pipe = lora_pixel_pipeline(HeunDiscreteScheduler(num_train_timesteps=1000))
    expected = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "StageAwareImagePipeline"] and (folder / "pipeline.py").is_file()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == report["ours"] == "StageAwareImagePipeline" and report["adapters"]
    if version.parse(diffusers.__version__) >= version.parse("0.42"):
        # stock DDPMPipeline refuses instead of sampling wrongly; diffusers 0.37 (our oldest) still loads the folder
        assert "trust_remote_code" in report["stock"]
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected, atol=1e-5)


def test_loading_waits_for_other_processes_loading_custom_code(tmp_path, monkeypatch):
    # diffusers rewrites the shared module file `diffusers_modules/local/pipeline.py` on every load: two torchrun
    # ranks loading at once could import each other's half-written copy (seen in CI: "no attribute ...Pipeline")
    monkeypatch.setattr("diffusers.utils.constants.HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "model"
    StageAwareImagePipeline(unet=tiny_unet_2d(), scheduler=DDPMScheduler()).save_pretrained(folder)
    loaded = []
    with custom_code_lock():  # another process loading
        thread = threading.Thread(target=lambda: loaded.append(StageAwareImagePipeline.from_pretrained(folder)))
        thread.start()
        thread.join(timeout=3)
        assert thread.is_alive() and not loaded
    thread.join(timeout=120)
    assert type(loaded[0]).__name__ == "StageAwareImagePipeline"

"""The accelerate training script and the merge script, end to end on tiny real pipelines (a few steps each)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file

from diffusers_stages import StageLoraAdapters
from diffusers_stages.testing import tiny_unet_2d

ROOT = Path(__file__).resolve().parents[2]


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adapter_tensors(folder):
    out = {}
    for sub in sorted(Path(folder).glob("stage*/")):
        for f in sub.glob("*.safetensors"):
            out.update({f"{sub.name}/{f.name}/{k}": v for k, v in load_file(f).items()})
    return out


FRESH_PROCESS = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert not any(m.startswith("diffusers_stages") for m in sys.modules), "diffusers_stages was imported"
unet = pipe.unet
x = torch.randn(2, unet.config.in_channels, {size}, {size}, generator=torch.Generator().manual_seed(0))
kw = {{"encoder_hidden_states": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))}} if hasattr(pipe, "text_encoder") else {{}}
with torch.no_grad():
    out = unet(x, torch.tensor([100, 700]), **kw).sample
np.save(sys.argv[2], out.numpy())
print(type(pipe).__name__)
"""


def fresh_process_output(folder, size, tmp_path):
    """Load ``folder`` with stock diffusers in a new interpreter that never imports diffusers_stages."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "fresh.npy"
    res = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS.format(size=size), str(folder), str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1], torch.from_numpy(np.load(out))


def expected_output(unet, adapters_dir, weights, size):
    adapters = StageLoraAdapters.from_pretrained(unet, adapters_dir)
    adapters.set_weights(weights)
    x = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    kw = {}
    if unet.config.in_channels == 4:
        kw = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        return unet(x, torch.tensor([100, 700]), **kw).sample


def test_stable_diffusion_single_stage_equals_all_stages_and_merged_loads_without_package(sd_folder, tmp_path):
    sd, data = sd_folder
    train = script("train_stage_lora")
    common = [
        "--pretrained_model_name_or_path", str(sd), "--train_data_dir", str(data), "--resolution", "32",
        "--train_batch_size", "2", "--max_train_steps", "2", "--num_stages", "2", "--rank", "2",
        "--lora_alpha", "4", "--seed", "3", "--learning_rate", "1e-2", "--consistency_loss",
    ]  # fmt: skip
    validation = [
        "--validation_prompt",
        "a digit",
        "--num_validation_images",
        "1",
        "--validation_inference_steps",
        "2",
    ]
    train.main([*common, "--output_dir", str(tmp_path / "all"), *validation])
    assert (tmp_path / "all" / "validation" / "0.png").is_file()
    train.main([*common, "--output_dir", str(tmp_path / "one"), "--stage", "1"])
    all_stages, one = adapter_tensors(tmp_path / "all"), adapter_tensors(tmp_path / "one")
    assert sorted({k.split("/")[0] for k in all_stages}) == ["stage0", "stage1"]
    assert set(one) == {k for k in all_stages if k.startswith("stage1/")}
    for k, v in one.items():
        torch.testing.assert_close(v, all_stages[k], rtol=0, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # trained: B moved off zero
    info = json.loads((tmp_path / "all" / "stage1" / "stage_adapter.json").read_text())
    assert info["timestep_range"] == [500, 1000] and info["training"]["consistency_loss"] is True

    merged = tmp_path / "merged"
    script("merge_stage_adapters").main(
        ["--pretrained_model_name_or_path", str(sd), "--adapters_dir", str(tmp_path / "all"),
         "--merge_weights", "0.5", "1.0", "--output_dir", str(merged)]
    )  # fmt: skip
    assert {"model_index.json", "README.md", "stages.json", "deme_merge.json"} <= set(os.listdir(merged))
    assert "| 1 | [500, 1000) | 1.0 |" in (merged / "README.md").read_text()
    name, out = fresh_process_output(merged, 16, tmp_path)
    assert name == "StableDiffusionPipeline"
    from diffusers import UNet2DConditionModel

    ref = expected_output(UNet2DConditionModel.from_pretrained(sd / "unet"), tmp_path / "all", [0.5, 1.0], 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_pixel_unet_resume_grid_search_merge(tmp_path):
    base = tmp_path / "ddpm"
    DDPMPipeline(unet=tiny_unet_2d(sample_size=8), scheduler=DDPMScheduler()).save_pretrained(base)
    train = script("train_stage_lora")
    common = [
        "--pretrained_model_name_or_path", str(base), "--dataset_name", "digits", "--resolution", "8",
        "--train_batch_size", "4", "--max_train_steps", "4", "--checkpointing_steps", "2", "--num_stages", "2",
        "--rank", "2", "--target_modules", "to_q", "to_v", "conv1", "--learning_rate", "1e-2",
        "--lr_scheduler", "linear", "--consistency_loss", "--prob_sampling", "0.3", "--channel_projection",
    ]  # fmt: skip
    train.main([*common, "--output_dir", str(tmp_path / "full"), "--checkpoints_total_limit", "1"])
    assert (tmp_path / "full" / "checkpoint-2").is_dir()  # the limit used to crash on a fresh output_dir
    # an interrupted run: only the step-2 checkpoint survives, then the run is resumed
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    train.main([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    full, resumed = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "resumed")
    assert set(full) == set(resumed) and any("channel_projection" in k for k in full)
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6)

    merged = tmp_path / "merged"
    script("merge_stage_adapters").main(
        ["--pretrained_model_name_or_path", str(base), "--adapters_dir", str(tmp_path / "full"), "--grid_search",
         "--grid_values", "0.5", "1.0", "--dataset_name", "digits", "--resolution", "8", "--num_heldout", "16",
         "--output_dir", str(merged)]
    )  # fmt: skip
    record = json.loads((merged / "deme_merge.json").read_text())
    assert len(record["merge_weights"]) == 2 and set(record["merge_weights"]) <= {0.5, 1.0}
    assert record["channel_projection"] is True and "grid search" in record["weight_source"]
    name, out = fresh_process_output(merged, 8, tmp_path)
    assert name == "DDPMPipeline"
    from diffusers import UNet2DModel

    ref = expected_output(UNet2DModel.from_pretrained(base / "unet"), tmp_path / "full", record["merge_weights"], 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_merge_script_needs_weights_or_search(capsys):
    with pytest.raises(SystemExit):
        script("merge_stage_adapters").main(
            ["--pretrained_model_name_or_path", "x", "--adapters_dir", "y", "--output_dir", "z"]
        )
    assert "exactly one of `merge_weights` and `grid_search`" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["train_stage_lora", "merge_stage_adapters"])
def test_scripts_import_the_package_of_their_own_checkout(name, tmp_path):
    """From another folder, without PYTHONPATH: the script's checkout wins over an installed copy."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import runpy, sys; runpy.run_path({str(ROOT / 'training' / f'{name}.py')!r}); "
    code += "print(sys.modules['diffusers_stages'].__file__)"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip().splitlines()[-1]).is_relative_to(ROOT / "diffusers_stages")

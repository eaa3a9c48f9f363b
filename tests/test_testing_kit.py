import subprocess
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel

from diffusers_stages.testing import tiny_clip_tokenizer, tiny_stable_diffusion_pipeline, tiny_unet_2d


def test_tokenizer_is_complete():
    tok = tiny_clip_tokenizer()
    assert tok.vocab_size == 514
    ids = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 0 and ids[1:4] != [1, 1, 1]


def test_tiny_stable_diffusion_round_trip(tmp_path):
    pipe = tiny_stable_diffusion_pipeline()
    kwargs = dict(num_inference_steps=2, output_type="np", guidance_scale=2.0)
    first = pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert first.shape == (2, 64, 64, 3) and np.isfinite(first).all() and first.std() > 0
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)  # HF_HUB_OFFLINE=1 in conftest
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "StableDiffusionPipeline" and loaded.tokenizer.vocab_size == 514
    second = loaded(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(first, second, atol=1e-5)
    other_prompt = loaded(["a bird", "a dog"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(other_prompt[0] - first[0]).max() > 0  # the text encoder conditions the output


def test_tiny_unet_2d_is_deterministic_and_loads(tmp_path):
    unet = tiny_unet_2d()
    assert unet.config.sample_size == 8
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    out = unet(x, t).sample
    assert out.shape == x.shape
    unet.save_pretrained(tmp_path)
    assert torch.allclose(UNet2DModel.from_pretrained(tmp_path)(x, t).sample, out, atol=1e-5)
    assert torch.allclose(tiny_unet_2d()(x, t).sample, out, atol=1e-6)


def test_saved_pipeline_loads_in_a_fresh_process(tmp_path):
    tiny_stable_diffusion_pipeline().save_pretrained(tmp_path)
    code = (
        "import sys, torch; from diffusers import DiffusionPipeline;"
        f"p = DiffusionPipeline.from_pretrained(r'{tmp_path}'); p.set_progress_bar_config(disable=True);"
        "im = p('x', num_inference_steps=1, output_type='np').images; assert im.shape == (1, 64, 64, 3);"
        "assert 'diffusers_stages' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, cwd=tmp_path)

import json

import numpy as np
import pytest
from accelerate.state import AcceleratorState
from PIL import Image

from diffusers_stages.testing import tiny_stable_diffusion_pipeline


@pytest.fixture
def sd_folder(tmp_path):
    """A tiny Stable Diffusion pipeline folder and a captioned 4-image folder (32x32)."""
    tiny_stable_diffusion_pipeline().save_pretrained(tmp_path / "sd")
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"digit {i}"}) + "\n")
    return tmp_path / "sd", data


@pytest.fixture
def fresh_accelerator_state():
    """Let a test pick its own mixed precision: accelerate keeps one per process otherwise."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()

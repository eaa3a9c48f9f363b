"""The wheel: built from the source tree, it ships every package, the top-level `model_cards/` templates (as
`diffusers_stages/model_cards/`), the license and the SPDX metadata; every card renders from the installed package."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
STAGES = [{"stage": 0, "start": 0, "end": 500, "weight": 0.5}, {"stage": 1, "start": 500, "end": 1000, "weight": 1.0}]
# Template variables for every card: a new template needs an entry here (the test checks the two lists agree).
CARD_FIELDS = {
    "deme_merged.md": {"stages": STAGES, "rank": 4, "lora_alpha": 8, "target_modules": ["to_q"], "metrics": {}},
    "multistage.md": {
        "model_type": "multi_decoder",
        "noise_process": "fdm_vp",
        "stages": {"num_stages": 2, "boundaries": [500], "num_train_timesteps": 1000},
        "metrics": {"fid": 1.5},
        "args": {"fdm_m": 3, "max_train_steps": 10, "output_dir": "out", "num_inference_steps": 20},
    },
    "stage_adapters.md": {
        "stages": STAGES,
        "rank": 4,
        "trained_stages": [0, 1],
        "repo_id": "user/adapters",
        "training": {"max_train_steps": 10},
    },
    "stage_aware_pipeline.md": {"pipeline_class": "StageAwareImagePipeline", "experts": "experts", "stages": STAGES},
}
RENDER = """
import json, sys
from pathlib import Path
import diffusers_stages
from diffusers_stages.hub import model_cards_dir, render_model_card

site, fields = Path(sys.argv[1]), json.loads(sys.argv[2])
assert Path(diffusers_stages.__file__).resolve().is_relative_to(site), diffusers_stages.__file__
assert model_cards_dir() == site / "diffusers_stages" / "model_cards", model_cards_dir()
names = sorted(p.name for p in model_cards_dir().glob("*.md"))
assert names == sorted(fields), f"templates {names} != CARD_FIELDS {sorted(fields)}"
for name in names:
    card = render_model_card(name, base_model="tiny/base", license="apache-2.0", **fields[name])
    assert card.data.library_name == "diffusers" and card.data.base_model == "tiny/base", name
    assert "{{" not in card.content and "{%" not in card.content, name
    print(name, len(card.content))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the files the build reads (the checkout stays clean of build/ and egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("diffusers_stages", "model_cards"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)]
    subprocess.run(cmd, check=True, timeout=300, cwd=tmp)
    (path,) = dist.glob("diffusers_stages-*.whl")
    return path


def test_wheel_ships_every_package_the_cards_and_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packages = {os.path.dirname(n).replace("/", ".") for n in names if n.startswith("diffusers_stages/")}
    source_packages = set(find_packages(str(ROOT), include=["diffusers_stages*"]))
    assert packages == source_packages | {"diffusers_stages.model_cards"}
    cards = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("diffusers_stages/model_cards/"))
    assert cards == sorted(p.name for p in (ROOT / "model_cards").glob("*.md")) and cards
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {"tensorboard", "wandb", "fid", "test", "dev"} <= set(meta.get_all("Provides-Extra"))
    runtime = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert not any(r.startswith("scipy") for r in runtime), runtime


def test_every_card_renders_from_the_installed_wheel(wheel, tmp_path):
    site, cwd = tmp_path / "site", tmp_path / "cwd"
    zipfile.ZipFile(wheel).extractall(site)
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RENDER, str(site), json.dumps(CARD_FIELDS)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(line.split()[0] for line in out.stdout.splitlines()) == sorted(CARD_FIELDS)

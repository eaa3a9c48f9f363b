import argparse

import pytest

from diffusers_stages.cli import DEMO_RUNS, _demo_config, main
from diffusers_stages.training import TrainingConfig

DEMO_ARGS = dict(
    dataset="digits",
    resolution=8,
    max_train_steps=2,
    train_batch_size=8,
    learning_rate=1e-3,
    num_inference_steps=1,
    fid_samples=0,
    seed=0,
    overwrite_output_dir=False,
)


def test_demo_runs_are_training_configs(tmp_path):
    args = argparse.Namespace(**DEMO_ARGS, output_dir=str(tmp_path))
    configs = {name: _demo_config(args, name) for name in DEMO_RUNS}
    assert all(isinstance(c, TrainingConfig) for c in configs.values())
    assert configs["multistage_fdm"].decoder_widths == [[32, 64, 64], [32, 64, 64], [16, 32, 32]]
    assert {c.max_train_steps for c in configs.values()} == {2} and configs["baseline"].use_ema
    assert not configs["baseline"].overwrite_output_dir  # a second demo into a used folder is refused
    with pytest.raises(ValueError, match="`max_train_steps`"):
        _demo_config(argparse.Namespace(**{**DEMO_ARGS, "max_train_steps": 0}, output_dir=str(tmp_path)), "baseline")


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    argv = [f"--{k}={v}" for k, v in DEMO_ARGS.items() if k != "overwrite_output_dir"]
    assert main(["demo", *argv, "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "results.md").exists()

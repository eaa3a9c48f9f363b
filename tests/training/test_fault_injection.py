"""Fault injection: SIGKILL at a checkpoint write and at a random step, a full disk during a checkpoint write, an
infinite gradient under a finite loss. Each interrupted run resumes with ``latest`` and must end where an
uninterrupted run ends."""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_stages.training import TrainingConfig, train
from diffusers_stages.training.checkpointing import list_checkpoints

DRIVER = Path(__file__).with_name("fault_driver.py")
REPO = Path(__file__).resolve().parents[2]
FIELDS = dict(
    dataset_name="digits",
    resolution=8,
    max_train_samples=16,  # 2 batches per epoch: resuming crosses an epoch boundary
    train_batch_size=8,
    block_out_channels=[8, 16],
    num_inference_steps=2,
    validation_steps=0,
    report_to="none",
    noise_process="edm_fdm",
    fdm_warmup_steps=4,
    use_ema=True,
    max_train_steps=6,
    checkpointing_steps=2,
    checkpoints_total_limit=2,
)


def run_with_fault(out: Path, fault: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "HF_DATASETS_OFFLINE": "1",
    }
    config = json.dumps({**FIELDS, "output_dir": str(out)})
    return subprocess.run(
        [sys.executable, str(DRIVER), config, fault], env=env, capture_output=True, text=True, timeout=600
    )


def resume(out: Path) -> None:
    train(TrainingConfig(**FIELDS, output_dir=str(out), resume_from_checkpoint="latest"))


def unet_weights(folder: Path) -> dict:
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = unet_weights(a), unet_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault") / "straight"
    train(TrainingConfig(**FIELDS, output_dir=str(out)))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    return out


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = run_with_fault(out, "kill_at_write:4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / ".checkpoint-4.tmp").is_dir()  # the half-written checkpoint is there, but hidden
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    resume(out)
    assert not (out / ".checkpoint-4.tmp").exists()
    assert_same_weights(uninterrupted, out)


def test_sigkill_at_a_random_step_resumes_from_latest(tmp_path, uninterrupted):
    step = random.Random(17).choice([3, 5])  # between checkpoints
    out = tmp_path / "run"
    proc = run_with_fault(out, f"kill_at_step:{step}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list_checkpoints(out)[-1].name == f"checkpoint-{step - 1}"
    resume(out)
    assert_same_weights(uninterrupted, out)


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = run_with_fault(out, "disk_full:4")
    assert proc.returncode == 1 and "No space left on device" in proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == [
        "checkpoint-2"
    ]  # the failed write left nothing behind, retention did not run
    assert not (out / "model_index.json").exists()
    resume(out)
    assert_same_weights(uninterrupted, out)


def test_an_infinite_gradient_stops_before_the_checkpoint_and_keeps_the_previous_one(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = run_with_fault(out, "inf_grad:4")
    name = re.search(r"infinite gradient of '([^']+)'", proc.stderr).group(1)
    assert proc.returncode == 1, proc.stderr[-2000:]
    message = f"FloatingPointError: parameter '{name}' is NaN or infinite after step 4; not writing checkpoint-4 "
    assert message + f"(the last good checkpoint is {out / 'checkpoint-2'})" in proc.stderr
    assert "training loss became non-finite" not in proc.stderr  # the loss of step 4 was finite
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / "model_index.json").exists()
    resume(out)
    assert_same_weights(uninterrupted, out)

"""DeMe jobs under faults and bad input: SIGKILL, a full disk or an infinite gradient during a LoRA run, resume on
another base, merges that would delete user data or write NaN weights, an EDM base without a timestep grid."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file, save_file

from diffusers_stages.deme.config import StageLoraConfig, StageMergeConfig
from diffusers_stages.deme.merge import merge_stages
from diffusers_stages.deme.training import train_stage_lora
from diffusers_stages.schedulers import FDMEDMScheduler
from diffusers_stages.testing import tiny_unet_2d
from diffusers_stages.training.checkpointing import list_checkpoints

DRIVER = Path(__file__).with_name("lora_fault_driver.py")
REPO = Path(__file__).resolve().parents[2]
LORA = dict(
    dataset_name="digits", resolution=8, train_batch_size=4, max_train_steps=6, checkpointing_steps=2,
    checkpoints_total_limit=2, num_stages=2, rank=2, target_modules=["to_q", "to_v"], learning_rate=1e-2,
)  # fmt: skip


def base_pipeline(folder: Path, seed: int = 0, scheduler=None) -> Path:
    DDPMPipeline(unet=tiny_unet_2d(sample_size=8, seed=seed), scheduler=scheduler or DDPMScheduler()).save_pretrained(
        folder
    )
    return folder


def lora_config(base: Path, out: Path, **fields) -> StageLoraConfig:
    return StageLoraConfig(pretrained_model_name_or_path=str(base), output_dir=str(out), **{**LORA, **fields})


def adapters(folder: Path) -> dict:
    return {
        f"{f.parent.name}/{k}": v for f in sorted(folder.glob("stage*/*.safetensors")) for k, v in load_file(f).items()
    }


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = base_pipeline(root / "base")
    train_stage_lora(lora_config(base, root / "straight"))
    return root, base


def driver_env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "HF_DATASETS_OFFLINE": "1",
    }


def driver_config(base: Path, out: Path) -> str:
    return json.dumps({**LORA, "pretrained_model_name_or_path": str(base), "output_dir": str(out)})


def run_lora_driver(base: Path, out: Path, fault: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(DRIVER), driver_config(base, out), fault]
    return subprocess.run(command, env=driver_env(), capture_output=True, text=True, timeout=600)


def resume_to_the_uninterrupted_adapters(root: Path, base: Path, out: Path) -> None:
    train_stage_lora(lora_config(base, out, resume_from_checkpoint="latest"))
    expected, got = adapters(root / "straight"), adapters(out)
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("fault, survivor", [("kill_at_write:4", "checkpoint-2"), ("kill_at_step:3", "checkpoint-2")])
def test_sigkilled_lora_run_resumes_to_the_uninterrupted_adapters(tmp_path, lora_runs, fault, survivor):
    root, base = lora_runs
    out = tmp_path / "run"
    proc = run_lora_driver(base, out, fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == [survivor]
    resume_to_the_uninterrupted_adapters(root, base, out)


@pytest.mark.parametrize(
    "fault, error",
    [
        ("disk_full:4", r"OSError: \[Errno 28\] No space left on device"),
        (
            "inf_grad:4",
            r"FloatingPointError: parameter '{name}' is NaN or infinite after step 4; not writing checkpoint-4 "
            r"\(the last good checkpoint is \S+checkpoint-2\)",
        ),
    ],
    ids=["full_disk", "infinite_gradient"],
)
def test_a_failed_lora_checkpoint_keeps_the_previous_one(tmp_path, lora_runs, fault, error):
    """A full disk during the write of ``checkpoint-4``, or a finite loss with an infinite gradient at step 4 (NaN
    weights): the run exits 1 naming the cause, ``checkpoint-2`` is intact, and ``latest`` resumes from it."""
    root, base = lora_runs
    out = tmp_path / "run"
    proc = run_lora_driver(base, out, fault)
    assert proc.returncode == 1, proc.stderr[-2000:]
    injected = re.search(r"infinite gradient of '([^']+)'", proc.stderr)
    assert re.search(error.format(name=re.escape(injected.group(1)) if injected else ""), proc.stderr)
    assert "training loss became non-finite" not in proc.stderr
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no temporary left
    assert not list(out.glob("stage*"))  # no final adapters
    resume_to_the_uninterrupted_adapters(root, base, out)


def tmpfs_mountable(folder: Path) -> bool:
    """Whether a tmpfs can be mounted on ``folder`` without privileges (in a user and mount namespace)."""
    folder.mkdir()
    probe = ["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs"]
    try:
        return subprocess.run([*probe, str(folder)], capture_output=True, timeout=60).returncode == 0
    except OSError:  # no `unshare`
        return False


def test_a_full_tmpfs_during_a_lora_checkpoint_keeps_the_previous_one(tmp_path, lora_runs):
    """A real full disk: the run writes into a tmpfs that holds ``checkpoint-2`` but not ``checkpoint-4`` next to it;
    its output folder is copied out of the mount namespace and resumed."""
    root, base = lora_runs
    if not tmpfs_mountable(tmp_path / "probe"):
        pytest.skip("no unprivileged tmpfs here; the injected ENOSPC of test_a_failed_lora_checkpoint_keeps_... runs")
    checkpoint = [f for f in (root / "straight" / "checkpoint-2").rglob("*") if f.is_file()]
    pages = sum(-(-f.stat().st_size // 4096) for f in checkpoint)
    disk, out = tmp_path / "disk", tmp_path / "run"
    disk.mkdir()
    script = (
        'mount -t tmpfs -o size="$1" tmpfs "$2" && "$3" "$4" "$5" none; status=$?; cp -a "$2/run" "$6"; exit $status'
    )
    args = [str(4096 * (pages * 3 // 2)), str(disk), sys.executable, str(DRIVER), driver_config(base, disk / "run")]
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args, str(out)]
    proc = subprocess.run(command, env=driver_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "in write_checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no temporary left
    resume_to_the_uninterrupted_adapters(root, base, out)


def test_resume_on_another_base_model_is_refused(tmp_path, lora_runs):
    root, base = lora_runs
    other = base_pipeline(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="different run.*base_fingerprint"):
        train_stage_lora(lora_config(other, root / "straight", resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match="is not empty"):
        train_stage_lora(lora_config(base, root / "straight"))


def test_merge_never_replaces_inputs_or_foreign_folders(tmp_path, lora_runs):
    root, base = lora_runs
    adapters_dir = root / "straight"
    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    for out, match in [
        (tmp_path / "file", "not a folder"),
        (adapters_dir, "overlaps the input `adapters_dir`"),
        (base, "overlaps the input `pretrained_model_name_or_path`"),
        (tmp_path / "folder", "not a merged pipeline"),
    ]:
        with pytest.raises(ValueError, match=match):
            merge_stages(
                StageMergeConfig(
                    pretrained_model_name_or_path=str(base),
                    adapters_dir=str(adapters_dir),
                    output_dir=str(out),
                    merge_weights=[0.5, 0.5],
                )
            )
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "folder" / "notes.txt").read_text() == "mine"


def test_merge_refuses_non_finite_adapters(tmp_path, lora_runs):
    root, base = lora_runs
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(root / "straight", broken)
    weights = next((broken / "stage1").glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(weights)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata=metadata)
    config = StageMergeConfig(
        pretrained_model_name_or_path=str(base),
        adapters_dir=str(broken),
        output_dir=str(tmp_path / "merged"),
        merge_weights=[0.5, 0.5],
    )
    with pytest.raises(ValueError, match="non-finite weights"):
        merge_stages(config)
    assert not (tmp_path / "merged").exists()


def test_an_edm_base_without_a_timestep_grid_is_refused(tmp_path):
    """Sigma-space bases are supported (tests/deme/test_sigma_space.py), but their stages are ranges of the
    scheduler's timestep grid: EDM's ``c_noise = ln(sigma) / 4`` conditioning has none."""
    base = base_pipeline(tmp_path / "edm", scheduler=FDMEDMScheduler(noise_conditioning="edm"))
    with pytest.raises(ValueError, match="noise_conditioning='index'"):
        train_stage_lora(lora_config(base, tmp_path / "out"))


def test_a_corrupt_adapter_file_is_named(tmp_path):
    from diffusers_stages.deme.adapters import read_lora_file

    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
        read_lora_file(path)


def test_full_finetuning_with_an_overflowing_learning_rate_writes_no_task_vector(tmp_path, lora_runs):
    _, base = lora_runs
    out = tmp_path / "full"
    config = lora_config(base, out, finetune="full", stage=0, max_train_steps=2, learning_rate=1e30)
    with pytest.raises(
        FloatingPointError, match="parameter '.+' is NaN or infinite after step 2; not writing the task"
    ):
        train_stage_lora(config)
    assert not list(out.glob("stage0/*"))

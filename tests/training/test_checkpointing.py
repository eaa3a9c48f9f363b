"""Which folders count as checkpoints, retention, and the resume checks (no training: a bare accelerator)."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator

from diffusers_stages.training.checkpointing import (
    TRAIN_STATE_NAME,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    write_checkpoint,
)


def fake_checkpoint(folder, name, complete=True):
    (folder / name).mkdir(parents=True)
    if complete:
        (folder / name / TRAIN_STATE_NAME).write_text(json.dumps({"step": 0, "fingerprint": {}}))


def test_only_complete_checkpoint_step_folders_count(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-4.bak", "checkpoint-4-copy", ".checkpoint-12.tmp"):
        fake_checkpoint(tmp_path, name)
    fake_checkpoint(tmp_path, "checkpoint-11", complete=False)  # killed before train_state.json
    (tmp_path / "checkpoint-12").write_text("a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert find_checkpoint(str(tmp_path), "latest").name == "checkpoint-10"
    assert find_checkpoint(str(tmp_path / "empty"), "latest") is None  # the run starts fresh


def test_retention_runs_after_the_write_and_spares_user_folders(tmp_path):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for name in ("checkpoint-1", "checkpoint-4-copy", "checkpoint-4.bak"):
        fake_checkpoint(tmp_path, name)
    write_checkpoint(accelerator, tmp_path / "checkpoint-2", {"step": 2, "fingerprint": {}}, limit=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-2", "checkpoint-4-copy", "checkpoint-4.bak"]
    assert (tmp_path / "checkpoint-2").stat().st_mode & 0o777 != 0o700  # the umask's mode, not mkdtemp's

    def full_disk(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_checkpoint(accelerator, tmp_path / "checkpoint-3", {"step": 3, "fingerprint": {}}, 1, full_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # nothing deleted, no temporary folder left


def test_resume_checks_ema_and_warns_on_changed_settings(tmp_path, caplog):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    settings = {"seed": 0, "train_batch_size": 8}
    write_checkpoint(
        accelerator, tmp_path / "checkpoint-1", {"step": 1, "fingerprint": {}, "settings": settings}, None
    )
    with pytest.raises(ValueError, match="saved without EMA weights"):
        load_checkpoint(accelerator, tmp_path / "checkpoint-1", {}, ema=object(), warmup=None, settings=settings)
    with caplog.at_level(logging.WARNING):
        step = load_checkpoint(accelerator, tmp_path / "checkpoint-1", {}, None, None, {**settings, "seed": 1})
    assert step == 1 and "seed 0 -> 1" in caplog.text

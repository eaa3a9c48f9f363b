"""Which folders count as checkpoints, retention, the resume checks and the finite-weights check (no training: a bare
accelerator)."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from diffusers_stages.models import MultiDecoderUNet2DModel
from diffusers_stages.testing import tiny_unet_2d
from diffusers_stages.training.checkpointing import (
    TRAIN_STATE_NAME,
    check_finite_weights,
    find_checkpoint,
    first_non_finite,
    list_checkpoints,
    load_checkpoint,
    load_ema_weights,
    save_checkpoint,
    with_ema_weights,
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


def tiny_ema(model, decay: float) -> EMAModel:
    return EMAModel(model.parameters(), decay=decay, model_cls=type(model), model_config=model.config)


def test_the_ema_is_a_diffusers_model_folder_and_resumes_exactly(tmp_path, caplog, monkeypatch):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    model = MultiDecoderUNet2DModel.from_unet(tiny_unet_2d(block_out_channels=(8, 16, 16)), [300, 700])
    ema = tiny_ema(model, decay=0.9)
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step(model.parameters())
    save_checkpoint(accelerator, tmp_path / "checkpoint-2", 2, {}, ema, None, None, {})
    resumed = tiny_ema(
        MultiDecoderUNet2DModel.from_unet(tiny_unet_2d(block_out_channels=(8, 16, 16)), [300, 700]), 0.8
    )
    monkeypatch.setattr(logging.getLogger("diffusers"), "handlers", [caplog.handler])  # diffusers does not propagate
    with caplog.at_level(logging.WARNING), caplog.at_level(logging.WARNING, logger="diffusers"):
        # a plain multi-decoder model folder holding the averaged weights, loadable without our checkpoint code
        plain = MultiDecoderUNet2DModel.from_pretrained(tmp_path / "checkpoint-2" / "unet_ema")
        assert "but are not expected" in caplog.text  # diffusers' warning on the EMA state in its config.json
        caplog.clear()
        load_checkpoint(accelerator, tmp_path / "checkpoint-2", {}, resumed, None, {})
        load_ema_weights(model, tmp_path / "checkpoint-2")
    assert "not expected" not in caplog.text  # muted where the EMA state is expected
    assert "changed EMA settings (decay 0.9 -> 0.8)" in caplog.text
    for loaded in (list(plain.parameters()), list(model.parameters()), resumed.shadow_params):
        assert all(torch.equal(a, b) for a, b in zip(loaded, ema.shadow_params, strict=True))
    assert resumed.optimization_step == 2 and resumed.decay == 0.8  # the resumed run's setting is kept


def test_first_non_finite_names_the_first_nan_or_inf_weight():
    big = torch.full((3,), 3e38)  # finite, though its 2-norm overflows
    assert first_non_finite([("empty", torch.empty(0)), ("big", big), ("half", big.half().clamp(-6e4, 6e4))]) is None
    named = [("a", torch.ones(2)), ("b", torch.tensor([1.0, float("nan")])), ("c", torch.tensor([float("inf")]))]
    assert first_non_finite(named) == "b"
    assert first_non_finite(named[::2]) == "c" and first_non_finite([]) is None


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    write_checkpoint(accelerator, tmp_path / "checkpoint-1", {"step": 1, "fingerprint": {}}, None)
    ema = EMAModel(model.parameters())
    named = with_ema_weights(list(model.named_parameters()), ema)
    check_finite_weights(accelerator, named, 2, "checkpoint-2", str(tmp_path))
    ema.shadow_params[1][0] = float("inf")
    message = "parameter 'ema.bias' is NaN or infinite after step 2; not writing checkpoint-2 .*checkpoint-1"
    with pytest.raises(FloatingPointError, match=message):
        check_finite_weights(accelerator, named, 2, "checkpoint-2", str(tmp_path))

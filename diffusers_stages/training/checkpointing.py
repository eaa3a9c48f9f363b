"""Resumable checkpoints: accelerate's state plus the EMA, the FDM warm-up and the step (safetensors / JSON).

The EMA is written with diffusers' own `EMAModel.save_pretrained` as in the diffusers training examples: a model
folder ``unet_ema/`` inside the checkpoint (loadable as a plain model of the trained class, its ``config.json`` also
holding the EMA's decay and step), read back with `EMAModel.from_pretrained`.

A checkpoint is written to a hidden temporary folder and renamed, so a folder ``checkpoint-N`` is always complete;
``train_state.json`` is its last file. Only folders named exactly ``checkpoint-<step>`` that hold it count as
checkpoints: ``latest`` and ``checkpoints_total_limit`` ignore everything else (``checkpoint-4.bak``,
``checkpoint-4-copy``, a half-written temporary folder), and retention runs only after a successful write. Its
fingerprint (model class and config, stage boundaries, noise process) must match the run that resumes it. Nothing
is written from broken weights: a non-finite loss (`check_finite_loss`, every step) or a NaN / infinite trainable or
EMA weight (`check_finite_weights`, before each save) stops the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..stages import TimestepStages
from ..utils import default_mode
from .config import TrainingConfig

logger = logging.getLogger(__name__)

TRAIN_STATE_NAME = "train_state.json"
EMA_MODEL_FOLDER = "unet_ema"  # the diffusers training examples' name
EMA_SETTINGS = ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")


def run_fingerprint(config: TrainingConfig, unet, stages: TimestepStages) -> dict:
    """What must match between a checkpoint and the run that resumes it."""
    model_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "model_class": type(unet).__name__,
        "model_config_sha": digest,
        "stage_boundaries": stages.boundaries,
        "noise_process": config.noise_process,
    }


def run_settings(config, num_processes: int) -> dict:
    """Settings a resumed run may change, but whose change breaks the equality with an uninterrupted run (``config``:
    a `TrainingConfig` or `StageLoraConfig`)."""
    return {
        "seed": config.seed,
        "train_batch_size": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": num_processes,
    }


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first: folders named ``checkpoint-<step>`` holding
    ``train_state.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if CHECKPOINT_PATTERN.fullmatch(p.name) and p.is_dir() and (p / TRAIN_STATE_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(output_dir: str, spec: str) -> Path | None:
    """The folder ``spec``, or for ``"latest"`` the newest complete checkpoint in ``output_dir`` (`None` when there is
    none yet: the run starts fresh, as in the diffusers training examples)."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"`resume_from_checkpoint` {spec!r} is not a checkpoint folder.")
        return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_train_state(path: Path, expected: dict) -> dict:
    """The checkpoint's ``train_state.json``, checked against the run's fingerprint ``expected``."""
    try:
        state = json.loads((path / TRAIN_STATE_NAME).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: cannot read {TRAIN_STATE_NAME} ({e}).") from e
    stored = state.get("fingerprint", {})
    mismatched = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    if mismatched:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"checkpoint {path} belongs to a different run ({detail}).")
    return state


def _write_extra_state(tmp: Path, state: dict, ema, warmup) -> None:
    """The trainer's additions: the EMA (``unet_ema/``, see the module docstring) and the FDM warm-up state."""
    if ema is not None:
        ema.save_pretrained(str(tmp / EMA_MODEL_FOLDER))
        state["ema"] = {"model": EMA_MODEL_FOLDER}
    if warmup is not None:
        state["fdm_warmup"] = warmup.state_dict()


def _publish(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` to ``path`` (an older ``path`` is moved aside first and then removed)."""
    os.chmod(tmp, default_mode(directory=True))
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    accelerator, path: Path, state: dict, limit: int | None, write_extra: Callable[[Path], None] | None = None
) -> None:
    """Write ``path`` atomically, then keep only the newest ``limit`` checkpoints (all when ``None``).

    Called by every process (accelerate's ``save_state`` expects that): the main process prepares the temporary
    folder, every process saves its state into it, the main process adds ``write_extra(tmp)``'s files and
    ``state`` as ``train_state.json`` (last: it marks the checkpoint complete), renames the folder and only then
    applies the retention. On any error the temporary folder is removed and the older checkpoints are untouched.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            if write_extra is not None:
                write_extra(tmp)
            (tmp / TRAIN_STATE_NAME).write_text(json.dumps(state, indent=2))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _publish(tmp, path)
        if limit is not None:
            found = list_checkpoints(path.parent)
            for old in found[: max(0, len(found) - limit)]:
                shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator, path: Path, step: int, fingerprint: dict, ema, warmup, limit: int | None, settings: dict
) -> None:
    """The trainer's checkpoint of ``step`` (accelerate's state, EMA, FDM warm-up), see :func:`write_checkpoint`."""
    state = {"step": step, "fingerprint": fingerprint, "settings": settings}
    write_checkpoint(accelerator, path, state, limit, lambda tmp: _write_extra_state(tmp, state, ema, warmup))


def _check_ema(path: Path, state: dict, ema) -> None:
    if ema is not None and "ema" not in state:
        raise ValueError(
            f"checkpoint {path} was saved without EMA weights (`use_ema=False`); resume it without `use_ema`."
        )
    if ema is None and "ema" in state:
        logger.warning("checkpoint %s holds EMA weights but `use_ema` is off: they are not used.", path)


def read_ema(checkpoint: str | os.PathLike, model_cls: type, foreach: bool = False):
    """The `EMAModel` of a trainer checkpoint, read with `EMAModel.from_pretrained` from its ``unet_ema/`` folder.

    Args:
        checkpoint (`str` or `os.PathLike`): A ``checkpoint-N`` folder of a run with ``use_ema``.
        model_cls (`type`): The trained model's class (`UNet2DModel`, `MultiDecoderUNet2DModel`, ...).
        foreach (`bool`, defaults to `False`): Passed to the `EMAModel`.
    """
    from diffusers.training_utils import EMAModel

    # The folder's config.json also holds the EMA state (decay, step, ...), which diffusers calls "not expected" in
    # a warning on every load: it is expected here, so the configuration logger is muted for this call only.
    config_logger = logging.getLogger("diffusers.configuration_utils")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        return EMAModel.from_pretrained(os.fspath(Path(checkpoint) / EMA_MODEL_FOLDER), model_cls, foreach=foreach)
    finally:
        config_logger.setLevel(level)


def _load_ema(path: Path, ema) -> None:
    """Restore ``ema``'s weights and step from the checkpoint ``path`` (on ``ema``'s devices and dtypes). The resumed
    run's EMA settings (``decay``, ...) are kept, with a warning when the checkpoint's differ."""
    saved = read_ema(path, ema.model_cls, foreach=ema.foreach)
    changed = {k: (getattr(saved, k), getattr(ema, k)) for k in EMA_SETTINGS if getattr(saved, k) != getattr(ema, k)}
    if changed:
        detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        logger.warning("resuming %s with changed EMA settings (%s).", path, detail)
    ema.shadow_params = [s.to(p.device, p.dtype) for s, p in zip(saved.shadow_params, ema.shadow_params, strict=True)]
    ema.optimization_step = saved.optimization_step


def load_ema_weights(model, checkpoint: str | os.PathLike) -> None:
    """Copy the EMA weights of a trainer checkpoint (its ``unet_ema/`` folder) into ``model``'s parameters."""
    read_ema(checkpoint, type(model)).copy_to(model.parameters())


def warn_changed_settings(path: Path, state: dict, settings: dict) -> None:
    """Warn when the resumed run's ``settings`` (seed, batch size, ...) differ from the checkpoint's."""
    stored = state.get("settings", {})
    changed = {k: (stored[k], v) for k, v in settings.items() if k in stored and stored[k] != v}
    if changed:
        detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        logger.warning(
            "resuming %s with changed settings (%s): the run will not equal an uninterrupted one.", path, detail
        )


def load_checkpoint(accelerator, path: Path, fingerprint: dict, ema, warmup, settings: dict) -> int:
    """Restore the run's state from ``path``; returns the step it was saved at."""
    state = read_train_state(path, fingerprint)
    _check_ema(path, state, ema)
    warn_changed_settings(path, state, settings)
    try:
        accelerator.load_state(str(path))
        if ema is not None:
            _load_ema(path, ema)
    except Exception as e:  # noqa: BLE001 - any failure here means the files are unusable
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: {e}") from e
    if warmup is not None:
        warmup.load_state_dict(state["fdm_warmup"])
    return int(state["step"])


def _last_good_checkpoint(output_dir: str) -> str:
    found = list_checkpoints(output_dir)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"


def check_finite_loss(accelerator, loss, step: int, output_dir: str) -> None:
    """Stop the run (on every process) when the loss of optimisation step ``step`` is NaN or infinite: the weights
    are then broken, so no checkpoint or pipeline is written from them; the error names the last good checkpoint."""
    losses = accelerator.gather(loss.detach().float().reshape(1))
    if all(math.isfinite(v) for v in losses.tolist()):
        return
    raise FloatingPointError(
        f"the training loss became non-finite ({losses.tolist()}) at step {step}; stopping "
        f"({_last_good_checkpoint(output_dir)}). Lower `learning_rate`, set `max_grad_norm`, or check the data."
    )


def first_non_finite(named: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    r"""
    The name of the first tensor of ``named`` holding a NaN or an infinity (`None` when every tensor is finite).

    One fused pass: ``torch._foreach_norm`` with ``ord=inf`` gives ``max |x|`` per tensor, which is finite exactly
    when the tensor is (NaN propagates, and unlike the 2-norm it cannot overflow on large finite weights); the
    per-tensor results are then read with a single device synchronisation.

    Args:
        named (`Sequence[tuple[str, torch.Tensor]]`): ``(name, tensor)`` pairs, e.g. ``model.named_parameters()``.
    """
    named = [(n, t.detach()) for n, t in named if t.numel() > 0]  # an empty tensor has no max
    if not named:
        return None
    norms = torch._foreach_norm([t for _, t in named], math.inf)
    finite = torch.isfinite(torch.stack([v.to(norms[0].device, torch.float32) for v in norms])).tolist()
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def check_finite_weights(
    accelerator, named: Sequence[tuple[str, torch.Tensor]], step: int, what: str, output_dir: str
) -> None:
    """Refuse (on every process) to write ``what`` (a checkpoint, the final pipeline or adapters) after optimisation
    step ``step`` when a weight of ``named`` (trainable parameters and EMA weights) is NaN or infinite, e.g. after a
    gradient overflow under a finite loss. Called by every process; the error names the first non-finite weight and
    the last good checkpoint, which stays untouched."""
    bad = first_non_finite(named)
    flags = accelerator.gather(torch.tensor([bad is not None], dtype=torch.int32, device=accelerator.device))
    if not flags.any():
        return
    where = f"parameter {bad!r}" if bad else f"a parameter of process {int(flags.nonzero()[0, 0])}"
    raise FloatingPointError(
        f"{where} is NaN or infinite after step {step}; not writing {what} ({_last_good_checkpoint(output_dir)}). "
        "Lower `learning_rate`, or check the data and `mixed_precision`."
    )


def with_ema_weights(named: list[tuple[str, torch.Tensor]], ema) -> list[tuple[str, torch.Tensor]]:
    """``named`` followed by ``ema``'s shadow weights as ``ema.<name>`` (``ema``: a diffusers `EMAModel` built over
    exactly ``named``'s parameters, in order; `None`: ``named`` alone), what :func:`check_finite_weights` checks."""
    if ema is None:
        return named
    return named + [(f"ema.{n}", s) for (n, _), s in zip(named, ema.shadow_params)]

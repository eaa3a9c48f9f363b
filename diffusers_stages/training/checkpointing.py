"""Resumable checkpoints: accelerate's state plus EMA weights, the FDM warm-up and the step (safetensors / JSON).

A checkpoint is written to a hidden temporary folder and renamed, so a folder ``checkpoint-N`` is always complete.
Its fingerprint (model class and config, stage boundaries, noise process) must match the run that resumes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..stages import TimestepStages
from .config import TrainingConfig

TRAIN_STATE_NAME = "train_state.json"
EMA_WEIGHTS_NAME = "ema.safetensors"


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


def _sorted_checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(output_dir: str, spec: str) -> Path:
    """The folder ``spec``, or for ``"latest"`` the newest ``checkpoint-*`` in ``output_dir``."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"`resume_from_checkpoint` {spec!r} is not a checkpoint folder.")
        return path
    found = _sorted_checkpoints(Path(output_dir))
    if not found:
        raise ValueError(f"`resume_from_checkpoint='latest'`: no checkpoint-* folder in {output_dir}.")
    return found[-1]


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


def save_checkpoint(accelerator, path: Path, step: int, fingerprint: dict, ema, warmup, limit: int | None) -> None:
    """Write ``path`` atomically; then keep only the newest ``limit`` checkpoints (all when ``None``). Every process
    calls it (accelerate's ``save_state`` is collective); only the main process touches the folders."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    state = {"step": step, "fingerprint": fingerprint}
    if ema is not None:
        save_file({f"p{i}": t.contiguous() for i, t in enumerate(ema.shadow_params)}, str(tmp / EMA_WEIGHTS_NAME))
        state["ema"] = {"optimization_step": ema.optimization_step}
    if warmup is not None:
        state["fdm_warmup"] = warmup.state_dict()
    (tmp / TRAIN_STATE_NAME).write_text(json.dumps(state, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    if limit is not None:
        found = _sorted_checkpoints(path.parent)
        for old in found[: max(0, len(found) - limit)]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator, path: Path, fingerprint: dict, ema, warmup) -> int:
    """Restore the run's state from ``path``; returns the step it was saved at."""
    from safetensors.torch import load_file

    state = read_train_state(path, fingerprint)
    try:
        accelerator.load_state(str(path))
        if ema is not None:
            tensors = load_file(str(path / EMA_WEIGHTS_NAME))
            for i, p in enumerate(ema.shadow_params):
                p.copy_(tensors[f"p{i}"])
            ema.optimization_step = state["ema"]["optimization_step"]
    except Exception as e:  # noqa: BLE001 - any failure here means the files are unusable
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: {e}") from e
    if warmup is not None:
        warmup.load_state_dict(state["fdm_warmup"])
    return int(state["step"])

"""Saving pipelines so that a reader never sees half a folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def save_pipeline(pipe, save_directory, **save_kwargs) -> Path:
    """
    ``pipe.save_pretrained`` into a temporary folder inside ``save_directory``, then move each component in,
    ``model_index.json`` last (it is what makes the folder a pipeline). Other files already in ``save_directory``
    (checkpoints, logs, samples) are kept.
    """
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".pipeline-"))
    try:
        pipe.save_pretrained(tmp, **save_kwargs)
        (out / "model_index.json").unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_component_modules() -> None:
    """Import our model and scheduler modules: diffusers loads a component class named in ``model_index.json`` only
    from a module already imported (the package itself imports lazily)."""
    import importlib

    for module in ("models", "schedulers"):
        importlib.import_module(f"diffusers_stages.{module}")


def load_pipeline(pretrained_model_name_or_path, **kwargs):
    """
    Load a pipeline folder or Hub repo whatever its class: a diffusers pipeline through
    ``DiffusionPipeline.from_pretrained``, one of ours (named in ``model_index.json``, e.g. a pixel model saved by
    ``train_multistage.py``, whose ``_class_name`` is ``["pipeline", "StageAwareImagePipeline"]``) through its own class,
    with no remote code.
    """
    import diffusers
    from diffusers import DiffusionPipeline

    from .. import pipelines as ours

    import_component_modules()

    name = DiffusionPipeline.load_config(pretrained_model_name_or_path, **kwargs).get("_class_name")
    if isinstance(name, list) and len(name) == 2:  # ["pipeline", <class>]: our custom-pipeline entry
        name = name[1]
    if isinstance(name, str) and not hasattr(diffusers, name) and hasattr(ours, name):
        return getattr(ours, name).from_pretrained(pretrained_model_name_or_path, **kwargs)
    return DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)

"""Checks that run before the first training step, so that no compute is spent on a run that cannot finish: the
output folder, the data paths, the image channels and the resolution against the UNet's downsampling."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .checkpointing import list_checkpoints
from .config import TrainingConfig

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that is a file, or a non-empty folder the run neither resumes nor may overwrite.

    With ``overwrite`` (``overwrite_output_dir``) the folder's complete ``checkpoint-<step>`` folders (ours) are
    removed so that ``latest`` and ``checkpoints_total_limit`` see only this run's; nothing else is deleted.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`output_dir` {out} exists and is not a folder.")
    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"`output_dir` {out} is not empty; resume the run in it (`resume_from_checkpoint='latest'`), choose "
            "another folder, or pass `overwrite_output_dir` to train over it."
        )
    for old in list_checkpoints(out):
        logger.warning("`overwrite_output_dir`: removing the previous run's %s", old)
        shutil.rmtree(old)


def check_data_paths(config: TrainingConfig) -> None:
    """``train_data_dir`` and ``stages_json`` must exist (a missing folder is not a Hub dataset id)."""
    if config.train_data_dir is not None and not os.path.isdir(config.train_data_dir):
        raise ValueError(f"`train_data_dir` {config.train_data_dir!r} is not a folder.")
    if config.stages_json is not None and not os.path.exists(config.stages_json):
        raise ValueError(f"`stages_json` {config.stages_json!r} does not exist (a stages.json or its folder).")


def resolve_num_channels(config: TrainingConfig, raw_dataset, pretrained_unet=None, sd=None) -> int:
    """The image channels the model trains on: 3 for Stable Diffusion (RGB into the VAE), the pretrained UNet's
    ``in_channels``, else ``num_channels`` or the data's (1 when its images are grayscale, else 3), logged."""
    from ..data import image_channels

    if sd is not None:
        return 3
    if pretrained_unet is not None:
        channels = pretrained_unet.config.in_channels
        if config.num_channels not in (None, channels):
            raise ValueError(
                f"`num_channels` is {config.num_channels} but the pretrained UNet takes {channels} channels."
            )
        return channels
    if config.num_channels is not None:
        return config.num_channels
    channels = image_channels(raw_dataset)
    logger.info("the data is %s: training a %d-channel model", "grayscale" if channels == 1 else "RGB", channels)
    return channels


def check_resolution(config: TrainingConfig, unet, sd=None) -> None:
    """``resolution`` must be divisible by the VAE's downsampling times the UNet's, ``2 ** (levels - 1)`` each."""
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if sd is not None:
        factor *= 2 ** (len(sd.vae.config.block_out_channels) - 1)
    if config.resolution % factor:
        raise ValueError(
            f"`resolution` must be a multiple of {factor} (the model downsamples by {factor}), "
            f"got {config.resolution}."
        )

"""Training: the typed config, objectives (DDPM / FDM / EDM / EDM-FDM), components, data, the accelerate loop,
checkpointing and run outputs.

    >>> from diffusers_stages.training import TrainingConfig, train
    >>> metrics = train(TrainingConfig(max_train_steps=2, resolution=8, block_out_channels=[16, 32]))
"""

from .components import build_noise_process, build_unet, load_stages, make_pipeline
from .config import TrainingConfig
from .loop import train
from .objectives import DiscreteObjective, EDMObjective
from .outputs import sample_images

__all__ = [
    "DiscreteObjective",
    "EDMObjective",
    "TrainingConfig",
    "build_noise_process",
    "build_unet",
    "load_stages",
    "make_pipeline",
    "sample_images",
    "train",
]

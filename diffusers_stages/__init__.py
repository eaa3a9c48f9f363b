"""diffusers-stages: timestep-staged diffusion models for Hugging Face diffusers."""

from .data import dataset_to_tensor, load_digits_dataset, load_image_dataset, load_mnist_dataset
from .deme import ChannelProjection, DeMeLossOutput, deme_loss, deme_training_step, sample_deme_timesteps
from .evaluation import (
    ClassifierFeatureExtractor,
    DigitClassifier,
    InceptionFeatureExtractor,
    fid,
    frechet_distance,
    load_or_train_classifier,
    save_image_grid,
)
from .lora import StageLoraAdapters, base_fingerprint, read_lora_file, read_stage_adapters, write_lora_file
from .merging import (
    MergeSearchOutput,
    grid_search_merge_weights,
    heldout_denoising_loss,
    lora_delta,
    merge_stage_adapter_files,
    merge_stage_adapters,
)
from .stages import TimestepStages

__version__ = "0.1.0.dev0"

__all__ = [
    "ChannelProjection",
    "ClassifierFeatureExtractor",
    "DeMeLossOutput",
    "DigitClassifier",
    "InceptionFeatureExtractor",
    "MergeSearchOutput",
    "StageLoraAdapters",
    "TimestepStages",
    "base_fingerprint",
    "dataset_to_tensor",
    "deme_loss",
    "deme_training_step",
    "fid",
    "frechet_distance",
    "grid_search_merge_weights",
    "heldout_denoising_loss",
    "load_digits_dataset",
    "load_image_dataset",
    "load_mnist_dataset",
    "load_or_train_classifier",
    "lora_delta",
    "merge_stage_adapter_files",
    "merge_stage_adapters",
    "read_lora_file",
    "read_stage_adapters",
    "sample_deme_timesteps",
    "save_image_grid",
    "write_lora_file",
]

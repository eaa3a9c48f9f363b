"""diffusers-stages: timestep-staged diffusion models for Hugging Face diffusers."""

from .clustering import (
    GradientSimilarityOutput,
    NoiseSchedule,
    TimestepClusteringOutput,
    cluster_timesteps,
    encode_latents,
    gradient_similarity,
    optimal_denoiser,
    plot_clustering,
)
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
from .models import MultiDecoderUNet2DConditionModel, MultiDecoderUNet2DModel, StageExpertsUNet
from .models.profiling import StageProfile, count_macs, count_parameters, stage_report
from .pipelines import StageAwareImagePipeline, StageAwareStableDiffusionPipeline, save_pipeline
from .pruning import (
    ProxyPruningOutput,
    PruningAction,
    PruningPolicy,
    PruningRound,
    SearchPolicy,
    flops_budgets,
    proxy_prune,
    prune_unet,
)
from .schedulers import (
    FDM_SIGMA_RANGES,
    FDMDDIMScheduler,
    FDMDPMSolverMultistepScheduler,
    FDMEDMScheduler,
    FDMLossWarmup,
    FDMSchedulerOutput,
    fdm_calibrated_sigma_max,
    fdm_scale,
)
from .stages import TimestepStages
from .tdc import DenoisingLossProxy

__version__ = "0.1.0.dev0"

__all__ = [
    "DenoisingLossProxy",
    "ProxyPruningOutput",
    "PruningAction",
    "PruningPolicy",
    "PruningRound",
    "SearchPolicy",
    "flops_budgets",
    "proxy_prune",
    "prune_unet",
    "base_fingerprint",
    "ChannelProjection",
    "ClassifierFeatureExtractor",
    "cluster_timesteps",
    "count_macs",
    "count_parameters",
    "dataset_to_tensor",
    "deme_loss",
    "deme_training_step",
    "DeMeLossOutput",
    "DigitClassifier",
    "encode_latents",
    "fdm_calibrated_sigma_max",
    "fdm_scale",
    "FDM_SIGMA_RANGES",
    "FDMDDIMScheduler",
    "FDMDPMSolverMultistepScheduler",
    "FDMEDMScheduler",
    "FDMLossWarmup",
    "FDMSchedulerOutput",
    "fid",
    "frechet_distance",
    "gradient_similarity",
    "GradientSimilarityOutput",
    "grid_search_merge_weights",
    "heldout_denoising_loss",
    "InceptionFeatureExtractor",
    "load_digits_dataset",
    "load_image_dataset",
    "load_mnist_dataset",
    "load_or_train_classifier",
    "lora_delta",
    "merge_stage_adapter_files",
    "merge_stage_adapters",
    "MergeSearchOutput",
    "MultiDecoderUNet2DConditionModel",
    "MultiDecoderUNet2DModel",
    "NoiseSchedule",
    "optimal_denoiser",
    "plot_clustering",
    "read_lora_file",
    "read_stage_adapters",
    "sample_deme_timesteps",
    "save_image_grid",
    "save_pipeline",
    "stage_report",
    "StageLoraAdapters",
    "StageAwareImagePipeline",
    "StageAwareStableDiffusionPipeline",
    "StageExpertsUNet",
    "StageProfile",
    "TimestepClusteringOutput",
    "TimestepStages",
    "write_lora_file",
]

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
from .evaluation import (
    ClassifierFeatureExtractor,
    DigitClassifier,
    InceptionFeatureExtractor,
    fid,
    frechet_distance,
    load_or_train_classifier,
    save_image_grid,
)
from .models import MultiDecoderUNet2DConditionModel, MultiDecoderUNet2DModel
from .models.profiling import StageProfile, count_macs, count_parameters, stage_report
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

__version__ = "0.1.0.dev0"

__all__ = [
    "ClassifierFeatureExtractor",
    "DigitClassifier",
    "FDM_SIGMA_RANGES",
    "FDMDDIMScheduler",
    "FDMDPMSolverMultistepScheduler",
    "FDMEDMScheduler",
    "FDMLossWarmup",
    "FDMSchedulerOutput",
    "InceptionFeatureExtractor",
    "MultiDecoderUNet2DConditionModel",
    "MultiDecoderUNet2DModel",
    "StageProfile",
    "TimestepStages",
    "count_macs",
    "count_parameters",
    "dataset_to_tensor",
    "fdm_calibrated_sigma_max",
    "fdm_scale",
    "GradientSimilarityOutput",
    "InceptionFeatureExtractor",
    "NoiseSchedule",
    "TimestepClusteringOutput",
    "TimestepStages",
    "cluster_timesteps",
    "dataset_to_tensor",
    "encode_latents",
    "fid",
    "frechet_distance",
    "gradient_similarity",
    "load_digits_dataset",
    "load_image_dataset",
    "load_mnist_dataset",
    "load_or_train_classifier",
    "optimal_denoiser",
    "plot_clustering",
    "save_image_grid",
    "stage_report",
]

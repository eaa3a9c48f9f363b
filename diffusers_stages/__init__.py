"""diffusers-stages: timestep-staged diffusion models for Hugging Face diffusers.

The public names below are imported on first use (a module ``__getattr__``, as diffusers does), so that
``import diffusers_stages`` and the ``diffusers-stages`` command start without loading torch and diffusers;
``from diffusers_stages import FDMEDMScheduler`` works as usual.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0.dev0"

# submodule -> the public names it provides (the single list: `__all__` is derived from it)
_EXPORTS: dict[str, list[str]] = {
    "clustering": [
        "cluster_timesteps",
        "encode_latents",
        "gradient_similarity",
        "GradientSimilarityOutput",
        "NoiseSchedule",
        "optimal_denoiser",
        "plot_clustering",
        "TimestepClusteringOutput",
    ],
    "data": ["dataset_to_tensor", "load_digits_dataset", "load_image_dataset", "load_mnist_dataset"],
    "deme": [
        "base_fingerprint",
        "ChannelProjection",
        "deme_loss",
        "deme_training_step",
        "DeMeLossOutput",
        "grid_search_merge_weights",
        "heldout_denoising_loss",
        "lora_delta",
        "merge_stage_adapter_files",
        "merge_stage_adapters",
        "MergeSearchOutput",
        "read_lora_file",
        "read_stage_adapters",
        "sample_deme_levels",
        "sample_deme_timesteps",
        "StageLoraAdapters",
        "StageLoraConfig",
        "StageMergeConfig",
        "StageMergeOutput",
        "merge_stages",
        "train_stage_lora",
        "write_lora_file",
    ],
    "evaluation": [
        "ClassifierFeatureExtractor",
        "DigitClassifier",
        "DigitMLPClassifier",
        "fid",
        "frechet_distance",
        "InceptionFeatureExtractor",
        "load_or_train_classifier",
        "save_image_grid",
    ],
    "models": ["MultiDecoderUNet2DConditionModel", "MultiDecoderUNet2DModel", "StageExpertsUNet"],
    "models.profiling": ["count_macs", "count_parameters", "stage_report", "StageProfile"],
    "pipelines": [
        "save_pipeline",
        "StageAwareImagePipeline",
        "StageAwareStableDiffusionImg2ImgPipeline",
        "StageAwareStableDiffusionInpaintPipeline",
        "StageAwareStableDiffusionPipeline",
        "StageAwareStableDiffusionXLPipeline",
        "switch_stage_experts",
    ],
    "schedulers": [
        "fdm_calibrated_sigma_max",
        "fdm_scale",
        "FDM_SIGMA_RANGES",
        "FDMDDIMScheduler",
        "FDMDPMSolverMultistepScheduler",
        "FDMEDMScheduler",
        "FDMLossWarmup",
        "FDMSchedulerOutput",
    ],
    "stages": ["TimestepStages"],
    "tdc": [
        "DenoisingLossProxy",
        "flops_budgets",
        "proxy_prune",
        "ProxyPruningOutput",
        "prune_unet",
        "PruningAction",
        "PruningCandidate",
        "PruningPolicy",
        "PruningRound",
        "run_tdc",
        "SearchPolicy",
        "TDCConfig",
    ],
    "training": ["train", "TrainingConfig"],
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_SOURCE, key=str.lower)


def __getattr__(name: str):
    """Import the submodule that provides ``name`` on first access and cache the value in the package."""
    if name not in _SOURCE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

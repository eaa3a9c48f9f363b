"""The pieces a training run is built from: stages, noise process (objective + sampler), UNet, output pipeline."""

from __future__ import annotations

import torch

from ..stages import TimestepStages
from .config import TrainingConfig
from .noise_levels import LogNormalSigma, LogUniformSigma, VPSigma


def load_stages(config: TrainingConfig, num_train_timesteps: int = 1000) -> TimestepStages:
    """``config.stages_json``, else uniform stages over the noise process's ``num_train_timesteps`` (``num_stages``
    for a multi-decoder model, one otherwise)."""
    if config.stages_json:
        return TimestepStages.from_pretrained(config.stages_json)
    num_stages = config.num_stages if config.model_type == "multi_decoder" else 1
    return TimestepStages.uniform(num_stages, num_train_timesteps)


def check_stages(config: TrainingConfig, stages: TimestepStages, num_train_timesteps: int) -> None:
    """Reject stages that do not fit the noise process or the stage-dependent fields of ``config``."""
    if stages.num_train_timesteps != num_train_timesteps:
        raise ValueError(
            f"the stages ({config.stages_json or 'uniform'}) cover {stages.num_train_timesteps} training timesteps "
            f"but the noise process has {num_train_timesteps}."
        )
    config.check_stages(stages.num_stages)


def build_noise_process(config: TrainingConfig, base_scheduler_config: dict | None = None):
    """Returns ``(objective, sampling_scheduler, warmup)`` for ``config.noise_process``.

    Args:
        config (`TrainingConfig`): Reads ``noise_process``, ``prediction_type``, ``fdm_m``, ``fdm_warmup_steps``,
            ``fdm_sigma_range``, ``sigma_min`` and ``sigma_max`` (the paper's per-variant defaults where unset).
        base_scheduler_config (`dict`, *optional*): The pretrained pipeline's scheduler config (discrete processes
            start from it; default: `DDPMScheduler`'s).
    """
    from ..schedulers import FDMLossWarmup

    steps = config.loss_warmup_steps
    warmup = FDMLossWarmup(warmup_steps=steps) if steps > 0 else None
    if config.noise_process in ("ddpm", "fdm"):
        return (*_discrete_process(config, base_scheduler_config, warmup), warmup)
    return (*_sigma_space_process(config, warmup), warmup)


def _discrete_process(config: TrainingConfig, base_scheduler_config: dict | None, warmup):
    """``(DiscreteObjective, sampling scheduler)`` of the DDPM / discrete FDM process."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from ..schedulers import FDMDDIMScheduler
    from .objectives import DiscreteObjective

    scheduler_config = dict(base_scheduler_config or DDPMScheduler().config)
    if config.prediction_type:
        scheduler_config["prediction_type"] = config.prediction_type
    if config.noise_process == "ddpm":
        train, sample = DDPMScheduler.from_config(scheduler_config), DDIMScheduler.from_config(scheduler_config)
        return DiscreteObjective(train), sample
    fdm = FDMDDIMScheduler.from_config(scheduler_config, m=config.fdm_multiplier, sigma_range=config.fdm_sigma_range)
    return DiscreteObjective(fdm, warmup=warmup), fdm


#: Training distribution of sigma per sigma-space variant (EDM's Table 1 and the FDM authors' losses).
SIGMA_DISTRIBUTIONS = {"edm": LogNormalSigma, "vp": VPSigma, "ve": LogUniformSigma}


def objective_for_scheduler(scheduler):
    r"""
    The training objective a pretrained pipeline's scheduler implies, without a warm-up (finetuning): the
    sigma-space `EDMObjective` with the variant's training distribution (``SIGMA_DISTRIBUTIONS[variant]()``) for an
    ``FDMEDMScheduler`` with ``noise_conditioning="index"`` (what the trainer saves), else the `DiscreteObjective`
    over the scheduler's betas. An objective passes through unchanged.

    Args:
        scheduler: An ``FDMEDMScheduler``, a scheduler with ``add_noise`` and ``alphas_cumprod`` (DDPM family), or an
            objective.
    """
    from ..schedulers import FDMEDMScheduler
    from .objectives import DiscreteObjective, EDMObjective

    if isinstance(scheduler, (DiscreteObjective, EDMObjective)):
        return scheduler
    if isinstance(scheduler, FDMEDMScheduler):
        if scheduler.config.noise_conditioning != "index":
            raise ValueError(
                "the `FDMEDMScheduler` must have `noise_conditioning='index'` (stages are ranges of its timestep grid "
                f"[0, T)), got {scheduler.config.noise_conditioning!r}."
            )
        return EDMObjective(scheduler, SIGMA_DISTRIBUTIONS[scheduler.config.variant]())
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(
            f"the scheduler {type(scheduler).__name__} is neither an `FDMEDMScheduler` nor a DDPM-family scheduler "
            "with betas (DDPM, DDIM, PNDM, Euler, FDMDDIM, ...)."
        )
    return DiscreteObjective(scheduler)


def _sigma_space_process(config: TrainingConfig, warmup):
    """``(EDMObjective, FDMEDMScheduler)`` of ``edm`` / ``vp`` / ``ve``, with FDM's ``c_in`` for the ``*_fdm`` ones."""
    from ..schedulers import FDMEDMScheduler
    from .objectives import EDMObjective

    variant = config.noise_process.removesuffix("_fdm")
    scheduler = FDMEDMScheduler(
        sigma_min=config.sampler_sigma_min,
        sigma_max=config.sigma_max,
        variant=variant,
        m=config.fdm_multiplier,
        input_scaling="fdm" if config.noise_process.endswith("_fdm") else "baseline",
        noise_conditioning="index",
        solver="heun",
    )
    return EDMObjective(scheduler, SIGMA_DISTRIBUTIONS[variant](), warmup=warmup), scheduler


def model_stage_boundaries(objective, stages: TimestepStages) -> list[float]:
    """The stage boundaries in the units of the ``timestep`` the model is called with."""
    from .objectives import EDMObjective

    if isinstance(objective, EDMObjective):
        sched = objective.scheduler
        return [
            float(sched.precondition_noise(sched.timestep_to_sigma(torch.tensor(float(b))))) for b in stages.boundaries
        ]
    return [float(b) for b in stages.boundaries]


def is_multi_decoder(unet) -> bool:
    """Whether ``unet`` is a multi-decoder model (its config stores stage boundaries)."""
    return "stage_boundaries" in getattr(unet, "config", {})


def new_pixel_unet(config: TrainingConfig, in_channels: int = 1):
    """A new `UNet2DModel` of ``config.block_out_channels`` widths, attention at the lowest level."""
    from diffusers import UNet2DModel

    n = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=config.resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=config.layers_per_block,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=min(8, min(config.block_out_channels)),
        attention_head_dim=8,
    )


def build_unet(config: TrainingConfig, stages: TimestepStages, objective, pretrained_unet=None, in_channels: int = 1):
    """The unified UNet (new from the config, or the pretrained one) or a multi-decoder UNet built from it."""
    from diffusers import UNet2DModel

    unet = pretrained_unet if pretrained_unet is not None else new_pixel_unet(config, in_channels)
    if config.model_type == "unified":
        if is_multi_decoder(unet):
            raise ValueError("the pretrained UNet is a multi-decoder model; use `model_type='multi_decoder'`.")
        return unet
    if is_multi_decoder(unet):
        if unet.num_stages != stages.num_stages:
            raise ValueError(
                f"the pretrained multi-decoder UNet has {unet.num_stages} stages, the stages {stages.num_stages}."
            )
        return unet
    boundaries = model_stage_boundaries(objective, stages)
    if isinstance(unet, UNet2DModel):
        from ..models import MultiDecoderUNet2DModel as cls
    else:
        from ..models import MultiDecoderUNet2DConditionModel as cls
    return cls.from_unet(unet, boundaries, decoder_block_out_channels=config.decoder_widths)


def make_pipeline(unet, scheduler, sd=None):
    """The output pipeline: Stable Diffusion around an SD UNet, else the pixel `StageAwareImagePipeline`."""
    from ..pipelines import StageAwareImagePipeline

    if sd is not None:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=sd.vae,
            text_encoder=sd.text_encoder,
            tokenizer=sd.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StageAwareImagePipeline(unet=unet, scheduler=scheduler)

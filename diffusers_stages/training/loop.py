"""The training loop: ``train(TrainingConfig(...))`` in four named steps (setup, one optimisation step, checkpoint,
finish).

Data order and all training noise are functions of ``(seed, micro-batch, global sample index)``, never of the rank:
the batch order comes from :class:`~diffusers_stages.training.data.ShardedBatchSampler`, the stage and noise levels of
micro-batch ``i`` from a generator every rank seeds alike, each sample's noise from its own generator
(:mod:`~diffusers_stages.training.distributed`). A run resumed from a checkpoint therefore ends where an uninterrupted
one ends, and ``N`` processes with batch ``B`` end where one process with batch ``N B`` ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import public_fields
from ..hub import start_hub_repo
from ..stages import TimestepStages
from ..utils import check_tracker_installed
from .checkpointing import (
    check_finite_loss,
    check_finite_weights,
    find_checkpoint,
    load_checkpoint,
    run_fingerprint,
    run_settings,
    save_checkpoint,
    with_ema_weights,
)
from .components import build_noise_process, build_unet, check_stages, is_multi_decoder, load_stages, make_pipeline
from .config import TrainingConfig
from .data import build_dataset, build_loader, iterate_batches, load_training_dataset
from .distributed import make_accelerator, micro_seed, rank_slice, sample_generators
from .outputs import save_run_outputs, save_validation_grid
from .preflight import check_data_paths, check_output_dir, check_resolution, resolve_num_channels

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """Everything one run holds between its steps (built by :func:`setup`)."""

    config: TrainingConfig
    stages: TimestepStages
    objective: Any
    sample_scheduler: Any
    warmup: Any
    sd: Any  # the pretrained Stable Diffusion pipeline (frozen VAE and text encoder), or None for pixel models
    raw_dataset: Any
    accelerator: Any
    unet: Any
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    ema: Any
    fingerprint: dict
    start_step: int = 0


def train(config: TrainingConfig) -> dict:
    """Run one training job described by ``config``; returns the final metrics (``{}`` on non-main processes).

    Example:

        >>> from diffusers_stages import TrainingConfig, train
        >>> metrics = train(TrainingConfig(max_train_steps=2, resolution=8, block_out_channels=[16, 32]))
    """
    run = setup(config)
    return finish(run, *fit(run))


def fit(run: TrainingRun) -> tuple[int, float]:
    """The optimisation steps with their logging and checkpoints; returns ``(last step, seconds)``."""
    start = time.perf_counter()
    step = run.start_step
    for step, batch_losses in _optimisation_steps(run):
        check_finite_loss(run.accelerator, batch_losses[0], step, run.config.output_dir)
        log_step(run, step, *batch_losses)
        checkpoint(run, step)
    return step, time.perf_counter() - start


def _load_pretrained(config: TrainingConfig):
    """``(unet, scheduler_config, sd)`` of ``pretrained_model_name_or_path`` (all ``None`` without one)."""
    if not config.pretrained_model_name_or_path:
        return None, None, None
    from ..pipelines import load_pipeline

    source = load_pipeline(config.pretrained_model_name_or_path)
    sd = source if hasattr(source, "text_encoder") else None
    if sd is not None and config.noise_process not in ("ddpm", "fdm"):
        raise ValueError("Stable Diffusion UNets train with the discrete noise processes: `noise_process` ddpm|fdm.")
    return source.unet, dict(source.scheduler.config), sd


def _accelerated(config: TrainingConfig, unet, train_dataset):
    """``(accelerator, unet, optimizer, loader, lr_scheduler)``; all but the (already sharded) loader prepared by
    accelerate. Multi-decoder UNets are wrapped with DDP's ``find_unused_parameters`` (decoders of stages absent
    from a micro-batch get no gradient); unified UNets are not."""
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(
        config.gradient_accumulation_steps,
        config.mixed_precision,
        None if config.report_to == "none" else config.report_to,
        ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
        find_unused_parameters=is_multi_decoder(unet),
    )
    loader = build_loader(config, train_dataset, accelerator.num_processes, accelerator.process_index)
    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    return accelerator, unet, optimizer, loader, lr_scheduler


def setup(config: TrainingConfig) -> TrainingRun:
    """Seed, stages, noise process, UNet, data, accelerate, EMA; resume from a checkpoint when asked."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    check_output_dir(config.output_dir, bool(config.resume_from_checkpoint), config.overwrite_output_dir)
    check_data_paths(config)
    check_tracker_installed(config.report_to)
    config = start_hub_repo(config)  # a bad token or repo name fails here, before anything is loaded
    set_seed(config.seed)  # before any model is built: new weights are a function of the seed
    pretrained_unet, base_scheduler_config, sd = _load_pretrained(config)
    objective, sample_scheduler, warmup = build_noise_process(config, base_scheduler_config)
    stages = load_stages(config, objective.num_train_timesteps)
    check_stages(config, stages, objective.num_train_timesteps)
    raw_ds = load_training_dataset(config, text_to_image=sd is not None)
    channels = resolve_num_channels(config, raw_ds, pretrained_unet, sd)
    unet = build_unet(config, stages, objective, pretrained_unet, in_channels=channels)
    check_resolution(config, unet, sd)
    train_ds = build_dataset(config, raw_ds, channels, tokenizer=sd.tokenizer if sd is not None else None)
    fingerprint = run_fingerprint(config, unet, stages)
    accelerator, unet, optimizer, loader, lr_scheduler = _accelerated(config, unet, train_ds)
    if sd is not None:
        for frozen in (sd.vae, sd.text_encoder):
            frozen.requires_grad_(False).to(accelerator.device)
    ema = None
    if config.use_ema:
        model = accelerator.unwrap_model(unet)
        ema = EMAModel(model.parameters(), decay=config.ema_decay, model_cls=type(model), model_config=model.config)
        ema.to(accelerator.device)
    run = TrainingRun(
        config, stages, objective, sample_scheduler, warmup, sd, raw_ds, accelerator, unet, optimizer,
        lr_scheduler, loader, ema, fingerprint,
    )  # fmt: skip
    _resume_and_start_logging(run)
    return run


def _resume_and_start_logging(run: TrainingRun) -> None:
    config, accelerator = run.config, run.accelerator
    if config.resume_from_checkpoint:
        ckpt = find_checkpoint(config.output_dir, config.resume_from_checkpoint)
        if ckpt is None:
            logger.info(
                "resume_from_checkpoint='latest': no checkpoint in %s yet; starting a new run", config.output_dir
            )
        else:
            settings = run_settings(config, accelerator.num_processes)
            run.start_step = load_checkpoint(accelerator, ckpt, run.fingerprint, run.ema, run.warmup, settings)
            logger.info("resumed from %s at step %d", ckpt, run.start_step)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        if accelerator.trackers == [] and config.report_to != "none":
            tracked = {k: str(v) for k, v in public_fields(config).items()}
            accelerator.init_trackers("multistage", config=tracked)
    if len(run.loader) // config.gradient_accumulation_steps == 0:
        raise ValueError("`gradient_accumulation_steps` exceeds the number of batches per epoch.")


def _optimisation_steps(run: TrainingRun):
    """Yields ``(step, (loss, losses, levels))`` after each optimisation step, from ``start_step + 1`` to the end."""
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    micro = run.start_step * config.gradient_accumulation_steps
    batches = iterate_batches(run.loader, micro)
    bar = tqdm(
        range(config.max_train_steps),
        initial=run.start_step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    step = run.start_step
    while step < config.max_train_steps:
        result = optimisation_step(run, next(batches), micro)
        micro += 1
        if accelerator.sync_gradients:
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result[0].item():.4f}")
            yield step, result
    bar.close()


def _draw_stage(run: TrainingRun, g: torch.Generator, micro: int) -> int | None:
    """The stage of this rank's micro-batch: ``train_stage``; drawn from the generator all ranks share (weighted /
    uniform); ``(rank + micro) mod K`` (per_rank); ``None``: one per sample (per_sample)."""
    config = run.config
    if config.train_stage is not None:
        return config.train_stage
    if config.stage_sampling == "stage_per_rank":
        return (run.accelerator.process_index + micro) % run.stages.num_stages
    if config.stage_sampling == "stage_per_batch_weighted":
        return int(torch.multinomial(run.objective.stage_weights(run.stages).float(), 1, generator=g))
    if config.stage_sampling == "stage_per_batch_uniform":
        return int(torch.randint(run.stages.num_stages, (1,), generator=g))
    return None


def optimisation_step(run: TrainingRun, batch: dict, micro: int):
    """One micro-batch: stage and noise levels drawn for the whole micro-batch of all ranks (this rank's slice kept),
    each sample's noise from its own generator (see :mod:`~diffusers_stages.training.distributed`), the loss,
    backward, clip, optimizer step (accelerate applies it once per ``gradient_accumulation_steps``).
    Returns ``(loss, losses, levels)``."""
    from diffusers.utils.torch_utils import randn_tensor

    config, accelerator, unet = run.config, run.accelerator, run.unet
    size = batch["pixel_values"].shape[0]
    shard = rank_slice(accelerator, size)
    shared_seed = micro_seed(config.seed, micro)
    g = torch.Generator().manual_seed(shared_seed)
    generators = sample_generators(shared_seed, shard.start, size)
    with accelerator.accumulate(unet):
        x0, model_kwargs = _encode_batch(batch, run.sd, accelerator, generators)
        stage = _draw_stage(run, g, micro)
        levels = run.objective.sample_levels(run.stages, stage, size * accelerator.num_processes, g)[shard]
        noise = randn_tensor(x0.shape, generator=generators, device=x0.device, dtype=x0.dtype)
        losses = run.objective.loss(unet, x0, noise, levels, **model_kwargs)
        loss = losses.mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), losses.detach(), levels


@torch.no_grad()
def _encode_batch(batch: dict, sd, accelerator, generators: list[torch.Generator]):
    """``(x0, model_kwargs)``: pixels, or SD latents (sampled with the per-sample ``generators``) with the prompt
    embeddings."""
    pixels = batch["pixel_values"].to(accelerator.device)
    if sd is None:
        return pixels, {}
    posterior = sd.vae.encode(pixels.to(sd.vae.dtype)).latent_dist
    latents = posterior.sample(generator=generators) * sd.vae.config.scaling_factor
    hidden = sd.text_encoder(batch["input_ids"].to(accelerator.device))[0]
    return latents, {"encoder_hidden_states": hidden}


def log_step(run: TrainingRun, step: int, loss, losses, levels) -> None:
    """After an optimisation step: EMA and FDM warm-up updates; log the loss, per-stage losses and learning rate."""
    if run.ema is not None:
        run.ema.step(run.accelerator.unwrap_model(run.unet).parameters())
    if run.warmup is not None:
        run.warmup.step()
    logs = {"loss": loss.item(), "lr": run.lr_scheduler.get_last_lr()[0]}
    stage_ids = run.objective.stage_of(run.stages, levels)
    for k in stage_ids.unique().tolist():
        logs[f"loss/stage_{k}"] = losses[stage_ids.to(losses.device) == k].mean().item()
    run.accelerator.log(logs, step=step)


def checkpoint(run: TrainingRun, step: int) -> None:
    """Every ``checkpointing_steps`` and at the end: a resumable checkpoint (refused when a trainable or EMA weight is
    not finite); every ``validation_steps``: a grid."""
    config, accelerator = run.config, run.accelerator
    if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
        path = Path(config.output_dir) / f"checkpoint-{step}"
        check_weights(run, step, path.name)
        settings = run_settings(config, accelerator.num_processes)
        limit = config.checkpoints_total_limit
        save_checkpoint(accelerator, path, step, run.fingerprint, run.ema, run.warmup, limit, settings)
    if accelerator.is_main_process and config.validation_steps and step % config.validation_steps == 0:
        save_validation_grid(config, accelerator, run.unet, run.ema, run.sample_scheduler, run.sd, step)


def check_weights(run: TrainingRun, step: int, what: str) -> None:
    """Refuse to write ``what`` when a trainable parameter or EMA weight is NaN or infinite (every process)."""
    named = with_ema_weights(list(run.accelerator.unwrap_model(run.unet).named_parameters()), run.ema)
    check_finite_weights(run.accelerator, named, step, what, run.config.output_dir)


def finish(run: TrainingRun, step: int, loop_seconds: float) -> dict:
    """The final model (EMA weights when kept) as a pipeline with samples, metrics and model card (refused when a
    weight is not finite)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    check_weights(run, step, "the final pipeline")
    metrics = {}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(run.unet)
        if run.ema is not None:
            run.ema.copy_to(final.parameters())
        pipe = make_pipeline(final, run.sample_scheduler, run.sd)
        run_info = {
            "train_seconds": loop_seconds,
            "train_steps_per_second": (step - run.start_step) / max(loop_seconds, 1e-9),
        }
        metrics = save_run_outputs(run.config, pipe, run.raw_dataset, run.stages, run_info)
    accelerator.wait_for_everyone()  # the outputs exist on return, on every rank (TDC reads them next)
    for tracker in accelerator.trackers:  # not `end_training`: it ends the process group, and runs may follow
        tracker.finish()
    return metrics

"""Decouple-then-Merge finetuning: one LoRA adapter per timestep stage, trained with accelerate (`train_stage_lora`).

The loop reads as named steps: `setup_run` (models, data, optimizers, checkpoint hooks), `resume_run`,
`train_stage_step` (one optimisation step of one stage), `save_checkpoint`, and `finish_run` (save the adapters,
`log_validation`, `push_adapters`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..configs import public_fields
from ..hub import start_hub_repo
from ..stages import TimestepStages
from ..training.checkpointing import (
    check_finite_loss,
    check_finite_weights,
    find_checkpoint,
    list_checkpoints,
    read_train_state,
    run_settings,
    warn_changed_settings,
    with_ema_weights,
    write_checkpoint,
)
from ..training.distributed import average_gradients
from ..training.distributed import make_accelerator as make_process_accelerator
from ..training.preflight import check_output_dir
from ..utils import atomic_file, check_tracker_installed, write_text
from .adapters import StageLoraAdapters, read_stage_adapters
from .config import StageLoraConfig
from .ema import StageEMA
from .inputs import (
    BaseComponents,
    encode_batch,
    load_base_components,
    load_training_images,
    micro_batch_generators,
    multi_decoder_stages,
)
from .losses import DeMeLossOutput, deme_training_step

logger = get_logger(__name__)

CHECKPOINT_ADAPTERS = "stage_adapters"  # the adapters' folder inside an accelerate checkpoint
TRAINING_RECORD_KEYS = (
    "max_train_steps", "train_batch_size", "learning_rate", "lr_scheduler", "resolution", "seed",
    "consistency_loss", "prob_sampling", "channel_projection", "mixed_precision",
    "finetune", "use_ema", "antithetic_timesteps", "train_norms_and_biases",
)  # fmt: skip


@dataclass
class StageLoraRun:
    """The state of a DeMe finetuning run between its steps (see `setup_run`)."""

    config: StageLoraConfig
    accelerator: Accelerator
    base: BaseComponents
    adapters: StageLoraAdapters
    train_stages: list[int]
    weight_dtype: torch.dtype
    images: torch.Tensor
    captions: list[str] | None
    unet: torch.nn.Module | None = None  # the UNet as prepared by accelerate
    optimizers: list = dataclasses.field(default_factory=list)
    lr_schedulers: list = dataclasses.field(default_factory=list)
    ema: StageEMA | None = None  # with `use_ema`: one EMA per trained stage
    teacher: torch.nn.Module | None = None  # full finetuning: the frozen base of the consistency term


def train_stage_lora(config: StageLoraConfig) -> str:
    r"""
    Decouple-then-Merge finetuning: train one LoRA adapter per timestep stage of a pretrained pipeline with DeMe's
    loss ``|eps - eps_k(x_t, t)|^2 + lambda |eps_theta(x_t, t) - eps_k(x_t, t)|^2`` (the consistency term when
    ``config.consistency_loss``; for a sigma-space base ``lambda(sigma) (|D_k - x0|^2 + lambda |D_theta - D_k|^2)``,
    `deme_training_step`), round robin over the stages, and save them to ``config.output_dir``.

    Micro-batch ``j`` of stage ``k``'s step ``s`` draws its images, timesteps and noise from generators keyed by
    ``(seed, k, s, j)`` and the global sample index (`micro_batch_generators`): a single-stage run equals the same
    stage of an all-stages run, and a resumed run equals an uninterrupted one. Launch with ``accelerate launch`` for
    several processes or mixed precision: by default process ``r`` of ``N`` holds samples ``[r B, (r + 1) B)`` of
    every micro-batch of ``N B`` samples and the stage's gradients (LoRA and channel projections) are averaged over
    the processes, so every process holds the same adapters and ``N`` processes x batch ``B`` train what one process
    x batch ``N B`` trains; with ``stage_parallel`` process ``r`` trains stages ``r, r + N, ...`` alone.

    Args:
        config (`StageLoraConfig`): Every option of the run.

    Returns:
        `str`: ``config.output_dir``, holding ``stages.json`` and a ``stage{k}/`` folder per trained stage.
    """
    if config.finetune == "full":
        from .full_training import train_stage_full

        return train_stage_full(config)
    run = setup_run(config)
    fit_run(run)
    finish_run(run)
    return config.output_dir


def fit_run(run: StageLoraRun) -> None:
    """The optimisation steps (round robin over the trained stages), logging and checkpoints."""
    config = run.config
    first_step = resume_run(run)
    bar = tqdm(
        range(first_step, config.max_train_steps), disable=not run.accelerator.is_local_main_process, desc="steps"
    )
    for step in bar:
        logs = {}
        for k, optimizer, lr_scheduler in zip(run.train_stages, run.optimizers, run.lr_schedulers):
            out = train_stage_step(run, k, step, optimizer, lr_scheduler)
            check_finite_loss(run.accelerator, out.loss, step + 1, config.output_dir)
            logs[f"loss/stage{k}"] = out.loss.item()
            logs[f"consistency/stage{k}"] = out.consistency_loss.item()
        run.accelerator.log(logs, step=step + 1)
        bar.set_postfix({key: f"{v:.4f}" for key, v in logs.items() if key.startswith("loss")})
        if (step + 1) % config.checkpointing_steps == 0 and step + 1 < config.max_train_steps:
            save_checkpoint(run, step + 1)


# ---------------------------------------------------------------------------------------------------- setup
def setup_run(config: StageLoraConfig) -> StageLoraRun:
    """The accelerator (seeded), the frozen base with fresh stage adapters, the data, one AdamW and LR schedule per
    trained stage (prepared by accelerate) and the checkpoint hooks."""
    check_output_dir(config.output_dir, bool(config.resume_from_checkpoint), config.overwrite_output_dir)
    check_tracker_installed(config.report_to)
    accelerator = make_accelerator(config)
    config = start_hub_repo(config)  # a bad token fails before the base model is loaded
    base = load_base_components(config.pretrained_model_name_or_path)
    stages, train_stages = resolve_stages(
        config, base.objective.num_train_timesteps, multi_decoder_stages(config.pretrained_model_name_or_path, base)
    )
    if config.stage_parallel:
        train_stages = train_stages[accelerator.process_index :: accelerator.num_processes]
        if not train_stages:
            raise ValueError(
                f"`stage_parallel` with {accelerator.num_processes} processes needs at least as many stages, "
                f"got {stages.num_stages}."
            )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    adapters = attach_adapters(config, base, stages, accelerator.device, weight_dtype)
    images, captions = load_training_images(
        config.data_source,
        base,
        config.resolution,
        config.image_column,
        config.caption_column,
        config.max_train_samples,
    )
    run = StageLoraRun(config, accelerator, base, adapters, train_stages, weight_dtype, images, captions)
    prepare_optimizers(run)
    if config.use_ema:
        run.ema = StageEMA(
            adapters.parameters, train_stages, config.ema_max_decay, config.ema_inv_gamma, config.ema_power
        )
        accelerator.register_for_checkpointing(run.ema)
    register_checkpoint_hooks(run)
    if accelerator.is_main_process and config.report_to != "none":
        tracked = {k: str(v) for k, v in public_fields(config).items()}
        accelerator.init_trackers("deme-lora", config=tracked)
    return run


def make_accelerator(config: StageLoraConfig) -> Accelerator:
    """The run's accelerator (mixed precision, tracker, project folders), seeded; fp16 on a CPU is refused."""
    accelerator = make_process_accelerator(
        1,  # accumulation is explicit: the gradients are averaged over the processes once per optimizer step
        config.mixed_precision,
        None if config.report_to == "none" else config.report_to,
        ProjectConfiguration(config.output_dir, os.path.join(config.output_dir, config.logging_dir)),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "`mixed_precision='fp16'` needs a GPU (accelerate does not autocast fp16 on CPU); use 'bf16'."
        )
    set_seed(config.seed)
    return accelerator


def resolve_stages(
    config: StageLoraConfig, num_train_timesteps: int, base_stages: TimestepStages | None = None
) -> tuple[TimestepStages, list[int]]:
    """The stages (``stages_json``, else the base's own stages ``base_stages`` of a multi-decoder base, else
    ``num_stages`` uniform ones) and the stages this run trains."""
    if config.stages_json:
        stages = TimestepStages.from_pretrained(config.stages_json)
    elif base_stages is not None:
        if base_stages.num_stages != config.num_stages:
            logger.warning(
                "the multi-decoder base has %d stages: DeMe uses them (`num_stages`=%d is ignored; pass "
                "`stages_json` for others).", base_stages.num_stages, config.num_stages,
            )  # fmt: skip
        stages = base_stages
    else:
        stages = TimestepStages.uniform(config.num_stages, num_train_timesteps)
    if stages.num_train_timesteps != num_train_timesteps:
        raise ValueError(
            f"`stages_json` is for T={stages.num_train_timesteps}, the scheduler has T={num_train_timesteps}."
        )
    if config.stage is not None:
        stages._check_stage(config.stage)
    return stages, (list(range(stages.num_stages)) if config.stage is None else [config.stage])


def attach_adapters(
    config: StageLoraConfig, base: BaseComponents, stages: TimestepStages, device, weight_dtype: torch.dtype
) -> StageLoraAdapters:
    """Freeze the base, move the VAE / text encoder to ``device`` in ``weight_dtype`` and attach fresh adapters
    (their training settings recorded for the model card)."""
    for module in (base.unet, base.vae, base.text_encoder):
        if module is not None:
            module.requires_grad_(False)
    for module in (base.vae, base.text_encoder):
        if module is not None:
            module.to(device, weight_dtype)
    # the UNet and its adapters stay float32 (accelerate's autocast does the mixed precision), so the trainable
    # weights need no `diffusers.training_utils.cast_training_params` upcast, unlike examples that cast the UNet
    adapters = StageLoraAdapters.attach(
        base.unet,
        stages,
        rank=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        channel_projection=config.channel_projection,
        base_model=config.pretrained_model_name_or_path,
        train_norms_and_biases=config.train_norms_and_biases,
    )
    if adapters.projection is not None:
        adapters.projection.to(device)
    adapters.training = {key: getattr(config, key) for key in TRAINING_RECORD_KEYS}
    adapters.training["dataset"] = config.data_source
    return adapters


def prepare_optimizers(run: StageLoraRun) -> None:
    """One AdamW and LR schedule per trained stage over its fp32 adapter weights, prepared by accelerate.

    The UNet is not wrapped in DDP (a stage's step uses one adapter; DDP would track the others as unused): the
    processes exchange exactly the stage's gradients in `train_stage_step`. accelerate steps a prepared LR schedule
    once per process at every optimizer step, so its lengths are scaled by the number of processes."""
    config = run.config
    optimizers, lr_schedulers = [], []
    for k in run.train_stages:
        params = run.adapters.parameters(k)
        for p in params:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
        optimizer = torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
        )
        optimizers.append(optimizer)
        lr_schedulers.append(
            get_scheduler(
                config.lr_scheduler,
                optimizer,
                num_warmup_steps=config.lr_warmup_steps * run.accelerator.num_processes,
                num_training_steps=config.max_train_steps * run.accelerator.num_processes,
            )
        )
    run.unet = run.base.unet.to(run.accelerator.device)
    if run.adapters.projection is not None:
        run.adapters.projection.to(run.accelerator.device)
    prepared = run.accelerator.prepare(*optimizers, *lr_schedulers)
    n = len(run.train_stages)
    run.optimizers, run.lr_schedulers = prepared[:n], prepared[n:]


# ---------------------------------------------------------------------------------------------------- checkpoints
def register_checkpoint_hooks(run: StageLoraRun) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` save and load only the trained adapters (not the base)."""
    accelerator, adapters, train_stages = run.accelerator, run.adapters, run.train_stages

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process or run.config.stage_parallel:  # stage-parallel: each process its stages
            adapters.save_pretrained(os.path.join(output_dir, CHECKPOINT_ADAPTERS), stages=train_stages)
        weights.clear()  # the frozen base is not checkpointed

    def load_hook(models, input_dir):
        models.clear()
        _, files = read_stage_adapters(os.path.join(input_dir, CHECKPOINT_ADAPTERS), train_stages)
        for f in files:
            adapters.load_stage_state_dict(f.stage, f.state_dict, f.channel_projection)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_fingerprint(run: StageLoraRun) -> dict:
    """What must match between a LoRA checkpoint and the run that resumes it: the base weights, the stages and the
    trained stages, and the adapters' shape (``train_norms_and_biases`` only when set: older checkpoints lack it)."""
    config = run.config
    fingerprint = {
        "base_fingerprint": run.adapters.fingerprint,
        "stage_boundaries": run.adapters.stages.boundaries,
        "train_stages": run.train_stages,
        "rank": config.rank,
        "target_modules": sorted(config.target_modules),
        "channel_projection": config.channel_projection,
    }
    return {**fingerprint, "train_norms_and_biases": True} if config.train_norms_and_biases else fingerprint


def save_checkpoint(run: StageLoraRun, step: int) -> None:
    """``accelerator.save_state`` into ``checkpoint-{step}`` atomically (temporary folder, ``train_state.json``
    last, rename), then keep at most ``checkpoints_total_limit`` complete checkpoints; called by every process.
    Refused (`FloatingPointError`) when a trained or EMA weight is not finite."""
    config, accelerator = run.config, run.accelerator
    state = {
        "step": step,
        "fingerprint": checkpoint_fingerprint(run),
        "settings": run_settings(config, accelerator.num_processes),
    }
    path = Path(config.output_dir) / f"checkpoint-{step}"
    check_stage_weights(run, run.train_stages, step, path.name)
    write_checkpoint(accelerator, path, state, config.checkpoints_total_limit)


def check_stage_weights(run: StageLoraRun, stages: list[int], step: int, what: str) -> None:
    """Refuse to write ``what`` when a trained weight of ``stages`` (or its EMA weight) is NaN or infinite; called
    by every process."""
    named = []
    for k in stages:
        named += with_ema_weights(run.adapters.named_parameters(k), run.ema.emas[k] if run.ema is not None else None)
    check_finite_weights(run.accelerator, named, step, what, run.config.output_dir)


def resume_run(run: StageLoraRun) -> int:
    """Load ``resume_from_checkpoint`` (a folder, or the newest complete checkpoint in ``output_dir`` for
    ``"latest"``) after checking it was written on the same base model and stages; return the first step to run."""
    config = run.config
    spec = config.resume_from_checkpoint
    if not spec:
        return 0
    if spec == "latest" and not list_checkpoints(config.output_dir):
        logger.info("No complete checkpoint in %s; starting a new run.", config.output_dir)
        return 0
    path = find_checkpoint(config.output_dir, spec)
    state = read_train_state(path, checkpoint_fingerprint(run))
    warn_changed_settings(path, state, run_settings(config, run.accelerator.num_processes))
    try:
        run.accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means the files are unusable
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: {e}") from e
    return int(state["step"])


# ---------------------------------------------------------------------------------------------------- one step
def train_stage_step(run: StageLoraRun, stage: int, step: int, optimizer, lr_scheduler) -> DeMeLossOutput:
    """
    One optimisation step of one stage: ``gradient_accumulation_steps`` micro-batches of ``train_batch_size x N``
    samples (``N`` processes; 1 with ``stage_parallel``), of which this process holds ``[r B, (r + 1) B)``. The image
    indices and timesteps of micro-batch ``j`` are drawn for all its samples from the generator every process seeds
    with ``(seed, stage, step, j)``, each sample's latent sample and noise from its own generator
    (`micro_batch_generators`). Then clipping, the optimizer and LR schedule steps. Returns the loss of the last
    micro-batch.
    """
    config, accelerator = run.config, run.accelerator
    replicas, rank = (1, 0) if config.stage_parallel else (accelerator.num_processes, accelerator.process_index)
    size = config.train_batch_size
    shard = slice(rank * size, (rank + 1) * size)
    for micro in range(config.gradient_accumulation_steps):
        g, sample_gens = micro_batch_generators(config.seed, stage, step, micro, shard)
        idx = torch.randint(0, len(run.images), (size * replicas,), generator=g)[shard]
        captions = [run.captions[i] for i in idx.tolist()] if run.captions is not None else None
        x0, text = encode_batch(run.base, run.images[idx], captions, accelerator.device, run.weight_dtype, sample_gens)
        with accelerator.autocast():
            out = deme_training_step(
                run.unet,
                run.adapters,
                run.base.objective,
                x0,
                stage,
                g,
                text,
                config.prob_sampling,
                config.consistency_loss,
                config.consistency_weight,
                antithetic_timesteps=config.antithetic_timesteps,
                teacher=run.teacher,
                noise_generators=sample_gens,
                num_shards=replicas,
                shard_index=rank,
            )
        accelerator.backward(out.loss / config.gradient_accumulation_steps)
    if not config.stage_parallel:
        average_gradients(accelerator, run.adapters.parameters(stage))
    accelerator.clip_grad_norm_(run.adapters.parameters(stage), config.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(stage)
    return out


# ---------------------------------------------------------------------------------------------------- finish
def finish_run(run: StageLoraRun) -> None:
    """Save the trained stages' adapters (with ``stage_parallel`` each process its own; refused when a weight is not
    finite), then (main process) validate and push to the Hub if asked."""
    config, accelerator = run.config, run.accelerator
    accelerator.wait_for_everyone()
    check_stage_weights(run, run.train_stages, config.max_train_steps, f"the adapters to {config.output_dir}")
    with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
        if config.stage_parallel and accelerator.num_processes > 1:
            run.adapters.save_pretrained(config.output_dir, stages=run.train_stages)
            accelerator.wait_for_everyone()
        elif accelerator.is_main_process:
            run.adapters.save_pretrained(config.output_dir, stages=run.train_stages)
    if accelerator.is_main_process:
        if config.validation_prompt and run.base.is_text_to_image:
            log_validation(run)
        if config.push_to_hub:
            push_adapters(config, run.adapters.stages, run.train_stages)
    for tracker in accelerator.trackers:  # not `end_training`: it ends the process group, and runs may follow
        tracker.finish()


def log_validation(run: StageLoraRun) -> list:
    """
    Sample ``validation_prompt`` stage-aware (each step uses its stage's adapter) with the training's own UNet, VAE
    and text encoder, under the run's mixed-precision autocast (the fp32 adapters on the UNet, the VAE and text
    encoder in the run's dtype, as in training); save the images to ``output_dir/validation`` and log them to
    tensorboard. Returns the PIL images.
    """
    from diffusers import StableDiffusionPipeline

    from ..pipelines.stage_switching import switch_stage_experts  # lazy: the pipelines import this package

    config, accelerator, base = run.config, run.accelerator, run.base
    pipe = StableDiffusionPipeline.from_pretrained(
        config.pretrained_model_name_or_path,
        unet=run.adapters.unet,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        torch_dtype=run.weight_dtype,
    ).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(config.seed)
    with switch_stage_experts(run.adapters.unet, run.adapters, lora_mode="unfused"), accelerator.autocast():
        images = pipe(
            [config.validation_prompt] * config.num_validation_images,
            num_inference_steps=config.validation_inference_steps,
            generator=g,
        ).images
    folder = os.path.join(config.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        with atomic_file(os.path.join(folder, f"{i}.png")) as tmp:
            im.save(tmp, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), dataformats="NHWC")
    return images


def push_adapters(config: StageLoraConfig, stages: TimestepStages, train_stages: list[int]) -> str:
    """Write the adapters' model card (``model_cards/stage_adapters.md``) into ``output_dir`` and upload the adapters
    (no checkpoints, logs or validation images). Returns the commit URL."""
    from ..configs import public_fields
    from ..hub import base_model_license, push_to_hub, render_model_card

    edges = [0, *stages.boundaries, stages.num_train_timesteps]
    card = render_model_card(
        "stage_adapters.md",
        base_model=config.pretrained_model_name_or_path,
        tags=["diffusers-training", "lora", "decouple-then-merge"],
        license=base_model_license(config.pretrained_model_name_or_path),
        stages=[{"stage": k, "start": a, "end": b} for k, (a, b) in enumerate(zip(edges, edges[1:]))],
        rank=config.rank,
        trained_stages=train_stages,
        repo_id=config.hub_model_id,
        training={k: v for k, v in public_fields(config).items() if k not in ("output_dir", "logging_dir")},
    )
    write_text(str(card), os.path.join(config.output_dir, "README.md"))
    return push_to_hub(
        config.output_dir,
        config.hub_model_id,
        token=config.hub_token,
        private=config.private,
        commit_message="DeMe stage adapters",
        ignore_patterns=["checkpoint-*/**", ".checkpoint-*/**", "logs/**", "validation/**"],
        required_files=("README.md", "stages.json"),
    )

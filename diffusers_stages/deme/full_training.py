"""Full-parameter Decouple-then-Merge finetuning (the paper's method): every UNet weight, one stage at a time.

Memory plan (Stable Diffusion v1, 860M parameters): ONE trainable fp32 UNet on the device with its AdamW state and,
with ``use_ema``, its EMA (about 4 x 3.4 GB), a frozen copy of the base in the run's weight dtype for the consistency
term (1.7 GB in bf16), and the base weights on the CPU (3.4 GB) to reset the UNet between stages. A finished stage
leaves the device as its task vector ``tau_k = theta_k - theta`` (its EMA weights with ``use_ema``) written to
``stage{k}/task_vector.safetensors`` in ``task_vector_dtype`` (bf16: 1.7 GB). So the stages never share the device
and four (or eight) stages of an SD UNet train on one GPU; the merge reads the task vectors back one by one.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..stages import TimestepStages
from .adapters import base_fingerprint
from .config import StageLoraConfig
from .ema import StageEMA
from .inputs import load_base_components, load_training_images, multi_decoder_stages
from .task_vectors import TASK_VECTOR_WEIGHT_NAME, compute_task_vector, save_stage_task_vector
from .training import (
    TRAINING_RECORD_KEYS,
    StageLoraRun,
    check_stage_weights,
    make_accelerator,
    resolve_stages,
    train_stage_step,
)

TASK_VECTOR_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class FullStageWeights:
    r"""
    The stand-in for `StageLoraAdapters` when every parameter is finetuned: the stage being trained owns all of the
    UNet's parameters. There is nothing to switch (one stage at a time) and no adapter to disable: the consistency
    term's teacher is a separate frozen copy (`StageLoraRun.teacher`).

    Args:
        unet (`torch.nn.Module`): The trainable UNet.
        stages (`TimestepStages`): The stages.
    """

    projection = None

    def __init__(self, unet: torch.nn.Module, stages: TimestepStages):
        self.unet, self.stages = unet, stages

    def set_stage(self, stage: int) -> None:
        self.stages._check_stage(stage)

    def parameters(self, stage: int) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters())

    def named_parameters(self, stage: int) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.unet.named_parameters())


def train_stage_full(config: StageLoraConfig) -> str:
    r"""
    Full-parameter DeMe finetuning: for each trained stage ``k`` in turn, reset the UNet to the pretrained
    ``theta``, finetune every parameter with DeMe's loss (the same step, batches and timestep draws as the LoRA path:
    `train_stage_step`, generators keyed by ``(seed, k, s, micro)``), and save ``tau_k = theta_k - theta`` (the EMA
    weights with ``use_ema``) in ``task_vector_dtype``. With ``resume_from_checkpoint``, stages whose task vector is already in
    ``output_dir`` are skipped (full finetuning resumes per stage, not per step).

    Args:
        config (`StageLoraConfig`): Every option of the run (``finetune="full"``).

    Returns:
        `str`: ``config.output_dir``, holding ``stages.json`` and ``stage{k}/task_vector.safetensors`` per stage.
    """
    run, base_state = setup_full_run(config)
    info = {"base_model": config.pretrained_model_name_or_path, "base_class": type(run.base.unet).__name__}
    info["base_fingerprint"] = base_fingerprint(run.base.unet)
    info["training"] = {key: getattr(config, key) for key in TRAINING_RECORD_KEYS}
    for k in run.train_stages:
        done = os.path.join(config.output_dir, run.adapters.stages.adapter_name(k), TASK_VECTOR_WEIGHT_NAME)
        if config.resume_from_checkpoint and os.path.isfile(done):
            continue
        train_one_full_stage(run, k, base_state)
        save_full_stage(run, k, base_state, info)
    run.accelerator.end_training()
    return config.output_dir


def setup_full_run(config: StageLoraConfig) -> tuple[StageLoraRun, dict[str, torch.Tensor]]:
    """The accelerator, the trainable fp32 UNet (prepared once), the frozen teacher (with the consistency term), the
    data, and the base weights on the CPU."""
    accelerator = make_accelerator(config)
    base = load_base_components(config.pretrained_model_name_or_path)
    stages, train_stages = resolve_stages(
        config, base.objective.num_train_timesteps, multi_decoder_stages(config.pretrained_model_name_or_path, base)
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (base.vae, base.text_encoder):
        if module is not None:
            module.requires_grad_(False).to(accelerator.device, weight_dtype)
    base_state = {k: v.detach().to("cpu", copy=True) for k, v in base.unet.state_dict().items()}
    teacher = None
    if config.consistency_loss:
        teacher = copy.deepcopy(base.unet).requires_grad_(False).eval().to(accelerator.device, weight_dtype)
    images, captions = load_training_images(
        config.data_source, base, config.resolution, config.image_column, config.caption_column,
        config.max_train_samples,
    )  # fmt: skip
    base.unet.float().requires_grad_(True).train()
    adapters = FullStageWeights(base.unet, stages)
    run = StageLoraRun(config, accelerator, base, adapters, train_stages, weight_dtype, images, captions)
    run.teacher = teacher
    run.unet = accelerator.prepare(base.unet)
    return run, base_state


def train_one_full_stage(run: StageLoraRun, stage: int, base_state: dict[str, torch.Tensor]) -> None:
    """Reset the UNet to the base, build a fresh AdamW / LR schedule / EMA, and run ``max_train_steps`` steps."""
    config, accelerator = run.config, run.accelerator
    unet = accelerator.unwrap_model(run.unet)
    unet.load_state_dict(base_state)
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )  # fmt: skip
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    run.ema = None
    if config.use_ema:
        run.ema = StageEMA(
            run.adapters.parameters, [stage], config.ema_max_decay, config.ema_inv_gamma, config.ema_power
        )
    bar = tqdm(range(config.max_train_steps), disable=not accelerator.is_local_main_process, desc=f"stage {stage}")
    for step in bar:
        out = train_stage_step(run, stage, step, optimizer, lr_scheduler)
        accelerator.log({f"loss/stage{stage}": out.loss.item()}, step=step + 1)
        bar.set_postfix({"loss": f"{out.loss.item():.4f}"})


def save_full_stage(run: StageLoraRun, stage: int, base_state: dict[str, torch.Tensor], info: dict) -> None:
    """Write stage ``stage``'s task vector (its EMA weights with ``use_ema``) from the main process; refused when a
    weight is not finite (the task vectors of finished stages stay)."""
    accelerator, stages = run.accelerator, run.adapters.stages
    accelerator.wait_for_everyone()
    check_stage_weights(run, [stage], run.config.max_train_steps, f"the task vector of stage {stage}")
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(run.unet)
        with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
            tau = compute_task_vector(unet.state_dict(), base_state, TASK_VECTOR_DTYPES[run.config.task_vector_dtype])
        stage_info = {
            **info,
            "stage": stage,
            "adapter_name": stages.adapter_name(stage),
            "timestep_range": list(stages.timestep_range(stage)),
            "boundaries": stages.boundaries,
            "num_train_timesteps": stages.num_train_timesteps,
            "task_vector_dtype": run.config.task_vector_dtype,
        }
        save_stage_task_vector(run.config.output_dir, stages, stage, tau, stage_info)
    accelerator.wait_for_everyone()

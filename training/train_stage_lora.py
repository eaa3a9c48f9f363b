#!/usr/bin/env python
"""Decouple-then-Merge finetuning with one LoRA adapter per timestep stage (accelerate).

    accelerate launch training/train_stage_lora.py \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --train_data_dir my_images \\
      --num_stages 4 --rank 8 --max_train_steps 1000 --consistency_loss --prob_sampling 0.3 --output_dir deme-lora

All stages train in one run by default (round robin, one optimizer and LR schedule per stage, one frozen base in
memory); ``--stage k`` trains one stage (stages can train on different machines: copy the ``stage{k}`` folders into
one directory afterwards). ``--max_train_steps`` counts optimizer steps PER STAGE. Every batch, noise and timestep of
stage k at step s comes from a generator seeded by (seed, k, s), so a single-stage run reproduces the same stage of an
all-stages run and a resumed run ends with the same adapters as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusers_stages.deme import deme_training_step
from diffusers_stages.deme.adapters import DEFAULT_TARGET_MODULES, StageLoraAdapters, read_stage_adapters
from diffusers_stages.deme.inputs import batch_generator, encode_batch, load_base_components, load_training_images
from diffusers_stages.stages import TimestepStages

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="local pipeline folder (SD or DDPM)")
    p.add_argument("--dataset_name", default=None, help="a `datasets` name, or 'mnist' / 'digits'")
    p.add_argument("--train_data_dir", default=None, help="an image folder (metadata.jsonl for captions)")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps per stage")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    p.add_argument("--output_dir", default="deme-lora")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--report_to", default="none", help="'tensorboard', 'wandb', 'all' or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora_alpha", type=float, default=None, help="defaults to the rank")
    p.add_argument("--target_modules", nargs="+", default=list(DEFAULT_TARGET_MODULES))
    p.add_argument("--validation_prompt", default=None)
    p.add_argument("--num_validation_images", type=int, default=2)
    p.add_argument("--validation_inference_steps", type=int, default=25)
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    p.add_argument("--stages_json", default=None, help="a stages.json (default: uniform --num_stages)")
    p.add_argument("--num_stages", type=int, default=4)
    p.add_argument("--stage", type=int, default=None, help="train only this stage")
    p.add_argument("--consistency_loss", action="store_true", help="DeMe's consistency term (teacher: adapters off)")
    p.add_argument("--consistency_weight", type=float, default=1.0)
    p.add_argument("--prob_sampling", type=float, default=0.0, help="DeMe's probabilistic sampling p (paper 0.3)")
    p.add_argument("--channel_projection", action="store_true", help="DeMe's channel-wise projection")
    args = p.parse_args(argv)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        p.error("pass exactly one of --dataset_name and --train_data_dir")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir)),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(args.seed)

    base = load_base_components(args.pretrained_model_name_or_path)
    T = base.noise_scheduler.config.num_train_timesteps
    stages = (
        TimestepStages.from_pretrained(args.stages_json)
        if args.stages_json
        else TimestepStages.uniform(args.num_stages, T)
    )
    if stages.num_train_timesteps != T:
        raise ValueError(f"`--stages_json` is for T={stages.num_train_timesteps}, the scheduler has T={T}.")
    if args.stage is not None:
        stages._check_stage(args.stage)
    train_stages = list(range(stages.num_stages)) if args.stage is None else [args.stage]

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (base.unet, base.vae, base.text_encoder):
        if module is not None:
            module.requires_grad_(False)
    for module in (base.vae, base.text_encoder):
        if module is not None:
            module.to(accelerator.device, weight_dtype)
    adapters = StageLoraAdapters.attach(
        base.unet,
        stages,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        target_modules=args.target_modules,
        channel_projection=args.channel_projection,
        base_model=args.pretrained_model_name_or_path,
    )
    if adapters.projection is not None:
        adapters.projection.to(accelerator.device)
    adapters.training = {
        key: getattr(args, key)
        for key in ("max_train_steps", "train_batch_size", "learning_rate", "lr_scheduler", "resolution", "seed")
        + ("consistency_loss", "prob_sampling", "channel_projection", "mixed_precision")
    }
    adapters.training["dataset"] = args.dataset_name or args.train_data_dir
    images, captions = load_training_images(
        args.dataset_name or args.train_data_dir,
        base,
        args.resolution,
        args.image_column,
        args.caption_column,
        args.max_train_samples,
    )

    optimizers, lr_schedulers = [], []
    for k in train_stages:
        params = adapters.parameters(k)
        for p in params:
            p.data = p.data.float()  # trainable LoRA weights stay fp32 under mixed precision
        opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        optimizers.append(opt)
        lr_schedulers.append(
            get_scheduler(
                args.lr_scheduler, opt, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
            )
        )
    unet, *prepared = accelerator.prepare(base.unet, *optimizers, *lr_schedulers)
    optimizers, lr_schedulers = prepared[: len(train_stages)], prepared[len(train_stages) :]

    adapters_ckpt = "stage_adapters"

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            adapters.save_pretrained(os.path.join(output_dir, adapters_ckpt), stages=train_stages)
        while weights:  # the frozen base is not checkpointed, only the adapters
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            models.pop()
        _, files = read_stage_adapters(os.path.join(input_dir, adapters_ckpt), train_stages)
        for f in files:
            adapters.load_stage_state_dict(f.stage, f.state_dict, f.channel_projection)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    first_step = 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            found = sorted(
                (d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")), key=lambda d: int(d[11:])
            )
            path = os.path.join(args.output_dir, found[-1]) if found else None
        if path is None:
            logger.info("No checkpoint found; starting a new run.")
        else:
            accelerator.load_state(path)
            first_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("deme-lora", config={k: str(v) for k, v in vars(args).items()})

    bar = tqdm(range(first_step, args.max_train_steps), disable=not accelerator.is_local_main_process, desc="steps")
    for step in bar:
        logs = {}
        for k, opt, sched in zip(train_stages, optimizers, lr_schedulers):
            for micro in range(args.gradient_accumulation_steps):
                g = batch_generator(args.seed, k, step, micro)
                idx = torch.randint(0, len(images), (args.train_batch_size,), generator=g)
                caps = [captions[i] for i in idx.tolist()] if captions is not None else None
                x0, text = encode_batch(base, images[idx], caps, accelerator.device, weight_dtype, generator=g)
                with accelerator.autocast():
                    out = deme_training_step(
                        unet,
                        adapters,
                        base.noise_scheduler,
                        x0,
                        k,
                        g,
                        text,
                        args.prob_sampling,
                        args.consistency_loss,
                        args.consistency_weight,
                    )
                accelerator.backward(out.loss / args.gradient_accumulation_steps)
            accelerator.clip_grad_norm_(adapters.parameters(k), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            logs[f"loss/stage{k}"] = out.loss.item()
            logs[f"consistency/stage{k}"] = out.consistency_loss.item()
        accelerator.log(logs, step=step + 1)
        bar.set_postfix({key: f"{v:.4f}" for key, v in logs.items() if key.startswith("loss")})
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.max_train_steps:
            save_checkpoint(accelerator, args, step + 1)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        adapters.save_pretrained(args.output_dir, stages=train_stages)
        if args.validation_prompt and base.is_text_to_image:
            log_validation(args, adapters, accelerator, weight_dtype)
        if args.push_to_hub:
            push_adapters(args, stages, train_stages)
    accelerator.end_training()


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, step: int) -> None:
    """``accelerator.save_state`` into ``checkpoint-{step}``, keeping at most ``--checkpoints_total_limit``."""
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        found = sorted(
            (d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")), key=lambda d: int(d[11:])
        )
        for old in found[: max(0, len(found) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(os.path.join(args.output_dir, old))
    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{step}"))


def log_validation(args, adapters: StageLoraAdapters, accelerator: Accelerator, weight_dtype) -> None:
    """Sample ``--validation_prompt`` stage-aware (the adapter of each step's stage) and save / log the images."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=accelerator.unwrap_model(adapters.unet), torch_dtype=weight_dtype
    ).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(args.seed)
    with adapters.stage_aware():
        images = pipe(
            [args.validation_prompt] * args.num_validation_images,
            num_inference_steps=args.validation_inference_steps,
            generator=g,
        ).images
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        im.save(os.path.join(folder, f"{i}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), dataformats="NHWC")


def push_adapters(args, stages: TimestepStages, train_stages: list[int]) -> None:
    from huggingface_hub import HfApi, ModelCard, ModelCardData

    card = ModelCard.from_template(
        ModelCardData(library_name="diffusers", base_model=args.pretrained_model_name_or_path, tags=["lora", "deme"]),
        template_str="---\n{{ card_data }}\n---\n\n# Decouple-then-Merge stage adapters\n\n{{ body }}\n",
        body=f"LoRA adapters (rank {args.rank}) for stages {train_stages} of {stages}. Merge them with "
        "`training/merge_stage_adapters.py` from diffusers-stages.",
    )
    card.save(os.path.join(args.output_dir, "README.md"))
    api = HfApi(token=args.hub_token)
    api.create_repo(args.hub_model_id, exist_ok=True)
    api.upload_folder(
        repo_id=args.hub_model_id,
        folder_path=args.output_dir,
        ignore_patterns=["checkpoint-*", "logs/*", "validation/*"],
        commit_message="DeMe stage adapters",
    )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Multi-stage / FDM diffusion training with accelerate: the library side of ``training/train_multistage.py``.

One run trains a unified UNet (baseline) or a multi-decoder UNet (one decoder per stage), in pixel space
(`UNet2DModel` family) or on Stable Diffusion latents (`UNet2DConditionModel` family), with the standard noise
process or FDM. Checkpoints hold everything needed to resume exactly: model, optimizer, lr schedule (accelerate's
``save_state``), EMA weights and the FDM warm-up state (safetensors / JSON, never pickles), and the step. Data order
and all training noise are functions of ``(seed, step)``, so a resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..stages import TimestepStages

logger = logging.getLogger(__name__)

NOISE_PROCESSES = ("ddpm", "fdm", "edm", "edm_fdm")
STAGE_SAMPLING = ("weighted", "uniform", "per_sample")
TRAIN_STATE_NAME = "train_state.json"
EMA_WEIGHTS_NAME = "ema.safetensors"


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Multi-stage (multi-decoder) and FDM diffusion training.")
    a = p.add_argument
    # model
    a("--pretrained_model_name_or_path", default=None, help="pipeline folder or Hub id to start from")
    a("--model_type", choices=("unified", "multi_decoder"), default="unified")
    a("--block_out_channels", type=int, nargs="+", default=[32, 64, 64], help="UNet widths (new pixel models)")
    a("--layers_per_block", type=int, default=1)
    a(
        "--decoder_block_out_channels",
        default=None,
        help="per-stage decoder widths, stage 0 first: '64,64,64;32,64,64;16,32,32' (default: the encoder's)",
    )
    # data
    a("--dataset_name", default="digits", help="'digits' (embedded), 'mnist', a datasets Hub name")
    a("--train_data_dir", default=None, help="local image folder (overrides --dataset_name)")
    a("--image_column", default=None)
    a("--caption_column", default=None)
    a("--max_train_samples", type=int, default=None)
    a("--resolution", type=int, default=16)
    a("--dataloader_num_workers", type=int, default=0)
    # noise process and stages
    a(
        "--noise_process",
        choices=NOISE_PROCESSES,
        default="edm",
        help="ddpm: discrete VP; fdm: discrete VP with FDM scaling; edm: EDM; edm_fdm: EDM with FDM's c_in",
    )
    a("--prediction_type", choices=("epsilon", "v_prediction", "sample"), default=None)
    a("--fdm_m", type=float, default=2.0, help="FDM multiplier m")
    a("--fdm_warmup_steps", type=int, default=200, help="FDM loss-weight warm-up length")
    a("--sigma_min", type=float, default=0.002)
    a("--sigma_max", type=float, default=80.0)
    a("--stages_json", default=None, help="stages.json (from `diffusers-stages cluster`)")
    a("--num_stages", type=int, default=3, help="uniform stages when no --stages_json")
    a(
        "--stage_sampling",
        choices=STAGE_SAMPLING,
        default="weighted",
        help="one stage per batch drawn by its base probability (weighted) or uniformly, or per sample",
    )
    a("--train_stage", type=int, default=None, help="train on this stage's timesteps only (TDC phase 2)")
    # optimisation
    a("--train_batch_size", type=int, default=64)
    a("--max_train_steps", type=int, default=1000)
    a("--learning_rate", type=float, default=1e-3)
    a("--lr_scheduler", default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=0.0)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    a("--use_ema", action="store_true")
    a("--ema_decay", type=float, default=0.999)
    a("--seed", type=int, default=0)
    # checkpoints, logging, outputs
    a("--output_dir", default="outputs/multistage")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    a("--report_to", default="tensorboard", help="'tensorboard', 'none', ...")
    a("--logging_dir", default="logs")
    a("--validation_steps", type=int, default=500)
    a("--num_validation_images", type=int, default=16)
    a("--num_inference_steps", type=int, default=18)
    a("--eval_fid_samples", type=int, default=0, help="samples for the final FID (0: skip)")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", default=None)
    a("--hub_token", default=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def parse_decoder_widths(spec: str | None) -> list[list[int]] | None:
    """``'64,64;32,32'`` (or JSON) -> ``[[64, 64], [32, 32]]``."""
    if spec is None:
        return None
    try:
        widths = (
            json.loads(spec)
            if spec.strip().startswith("[")
            else [[int(c) for c in part.split(",")] for part in spec.split(";")]
        )
    except ValueError as e:
        raise ValueError(f"`--decoder_block_out_channels` must look like '64,64;32,32', got {spec!r}.") from e
    return widths


def load_stages(args) -> TimestepStages:
    if args.stages_json:
        return TimestepStages.from_pretrained(args.stages_json)
    return TimestepStages.uniform(args.num_stages if args.model_type == "multi_decoder" else 1)


def validate_args(args, stages: TimestepStages, num_train_timesteps: int) -> None:
    """Reject inconsistent arguments before anything is trained."""
    if args.max_train_steps < 1 or args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise ValueError("`--max_train_steps`, `--train_batch_size` and `--gradient_accumulation_steps` must be >= 1.")
    if stages.num_train_timesteps != num_train_timesteps:
        raise ValueError(
            f"the stages ({args.stages_json or 'uniform'}) cover {stages.num_train_timesteps} training timesteps but "
            f"the noise process has {num_train_timesteps}."
        )
    widths = parse_decoder_widths(args.decoder_block_out_channels)
    if widths is not None:
        if args.model_type != "multi_decoder":
            raise ValueError("`--decoder_block_out_channels` needs `--model_type multi_decoder`.")
        if len(widths) != stages.num_stages:
            raise ValueError(
                f"`--decoder_block_out_channels` gives {len(widths)} decoders but there are {stages.num_stages} stages."
            )
    if args.train_stage is not None and not 0 <= args.train_stage < stages.num_stages:
        raise ValueError(f"`--train_stage` must lie in [0, {stages.num_stages}), got {args.train_stage}.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id`.")


# ---------------------------------------------------------------------------------------------- components
def build_noise_process(args, base_scheduler_config: dict | None = None):
    """Returns ``(objective, sampling_scheduler, warmup)`` for ``--noise_process``."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from ..schedulers import FDMDDIMScheduler, FDMEDMScheduler, FDMLossWarmup
    from .objectives import DiscreteObjective, EDMObjective

    if args.noise_process in ("ddpm", "fdm"):
        config = dict(base_scheduler_config or DDPMScheduler().config)
        if args.prediction_type:
            config["prediction_type"] = args.prediction_type
        if args.noise_process == "ddpm":
            train = DDPMScheduler.from_config(config)
            sample = DDIMScheduler.from_config(config)
        else:
            train = sample = FDMDDIMScheduler.from_config(config, m=args.fdm_m)
        return DiscreteObjective(train), sample, None
    if args.sigma_min <= 0 or args.sigma_min >= args.sigma_max:
        raise ValueError(f"need 0 < --sigma_min < --sigma_max, got {args.sigma_min}, {args.sigma_max}.")
    fdm = args.noise_process == "edm_fdm"
    scheduler = FDMEDMScheduler(
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        variant="edm",
        m=args.fdm_m,
        input_scaling="fdm" if fdm else "baseline",
        noise_conditioning="index",
        solver="heun",
    )
    warmup = FDMLossWarmup(warmup_steps=args.fdm_warmup_steps) if fdm else None
    return EDMObjective(scheduler, warmup=warmup), scheduler, warmup


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
    return "stage_boundaries" in getattr(unet, "config", {})


def build_unet(args, stages: TimestepStages, objective, pretrained_unet=None, in_channels: int = 1):
    """The unified UNet (new from flags, or the pretrained one) or a multi-decoder UNet built from it."""
    from diffusers import UNet2DModel

    unet = pretrained_unet
    if unet is None:
        n = len(args.block_out_channels)
        unet = UNet2DModel(
            sample_size=args.resolution,
            in_channels=in_channels,
            out_channels=in_channels,
            layers_per_block=args.layers_per_block,
            block_out_channels=tuple(args.block_out_channels),
            down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            norm_num_groups=min(8, min(args.block_out_channels)),
            attention_head_dim=8,
        )
    if args.model_type == "unified":
        if is_multi_decoder(unet):
            raise ValueError("the pretrained UNet is a multi-decoder model; use `--model_type multi_decoder`.")
        return unet
    if is_multi_decoder(unet):
        if unet.num_stages != stages.num_stages:
            raise ValueError(
                f"the pretrained multi-decoder UNet has {unet.num_stages} stages, the stages {stages.num_stages}."
            )
        return unet
    widths = parse_decoder_widths(args.decoder_block_out_channels)
    boundaries = model_stage_boundaries(objective, stages)
    if isinstance(unet, UNet2DModel):
        from ..models import MultiDecoderUNet2DModel as cls
    else:
        from ..models import MultiDecoderUNet2DConditionModel as cls
    return cls.from_unet(unet, boundaries, decoder_block_out_channels=widths)


# ---------------------------------------------------------------------------------------------- data
class EpochSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``: resumable data order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def build_dataset(args, channels: int, tokenizer=None):
    """A `datasets.Dataset` with a torch transform: ``pixel_values`` in ``[-1, 1]`` and ``input_ids`` when captioned."""
    import numpy as np
    from PIL import Image

    from ..data import load_image_dataset

    ds = load_image_dataset(
        args.train_data_dir or args.dataset_name,
        resolution=args.resolution,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_samples=args.max_train_samples,
    )
    if tokenizer is not None and "text" not in ds.column_names:
        raise ValueError("a text-to-image model needs captions: pass `--caption_column` or a metadata.jsonl.")
    mode = "L" if channels == 1 else "RGB"

    def transform(batch):
        out = {}
        pixels = []
        for im in batch["image"]:
            im = im.convert(mode)
            if im.size != (args.resolution, args.resolution):
                im = im.resize((args.resolution, args.resolution), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
            pixels.append(torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)) / 127.5 - 1)
        out["pixel_values"] = pixels
        if tokenizer is not None:
            ids = tokenizer(
                list(batch["text"]),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out["input_ids"] = list(ids)
        return out

    return ds, ds.with_transform(transform)


def collate(examples):
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    if "input_ids" in examples[0]:
        batch["input_ids"] = torch.stack([e["input_ids"] for e in examples])
    return batch


# ---------------------------------------------------------------------------------------------- checkpoints
def run_fingerprint(args, unet, stages: TimestepStages) -> dict:
    """What must match between a checkpoint and the run that resumes it."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "model_class": type(unet).__name__,
        "model_config_sha": digest,
        "stage_boundaries": stages.boundaries,
        "noise_process": args.noise_process,
    }


def find_checkpoint(output_dir: str, spec: str) -> Path:
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"`--resume_from_checkpoint` {spec!r} is not a checkpoint folder.")
        return path
    found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise ValueError(f"`--resume_from_checkpoint latest`: no checkpoint-* folder in {output_dir}.")
    return found[-1]


def read_train_state(path: Path, expected: dict) -> dict:
    state_file = path / TRAIN_STATE_NAME
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: cannot read {TRAIN_STATE_NAME} ({e}).") from e
    mismatched = {
        k: (state.get("fingerprint", {}).get(k), v)
        for k, v in expected.items()
        if state.get("fingerprint", {}).get(k) != v
    }
    if mismatched:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"checkpoint {path} belongs to a different run ({detail}).")
    return state


def save_checkpoint(accelerator, path: Path, step: int, fingerprint: dict, ema, warmup, limit: int | None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    state = {"step": step, "fingerprint": fingerprint}
    if ema is not None:
        save_file({f"p{i}": t.contiguous() for i, t in enumerate(ema.shadow_params)}, str(tmp / EMA_WEIGHTS_NAME))
        state["ema"] = {"optimization_step": ema.optimization_step}
    if warmup is not None:
        state["fdm_warmup"] = warmup.state_dict()
    (tmp / TRAIN_STATE_NAME).write_text(json.dumps(state, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    if limit is not None:
        found = sorted(path.parent.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        for old in found[: max(0, len(found) - limit)]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator, path: Path, fingerprint: dict, ema, warmup) -> int:
    from safetensors.torch import load_file

    state = read_train_state(path, fingerprint)
    try:
        accelerator.load_state(str(path))
        if ema is not None:
            tensors = load_file(str(path / EMA_WEIGHTS_NAME))
            for i, p in enumerate(ema.shadow_params):
                p.copy_(tensors[f"p{i}"])
            ema.optimization_step = state["ema"]["optimization_step"]
    except Exception as e:  # noqa: BLE001 - any failure here means the files are unusable
        raise ValueError(f"checkpoint {path} is corrupt or incomplete: {e}") from e
    if warmup is not None:
        warmup.load_state_dict(state["fdm_warmup"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------- training
def train(args: argparse.Namespace) -> dict:
    """Run one training job described by ``args`` (see :func:`build_parser`); returns the final metrics."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    set_seed(args.seed)  # before any model is built: new weights are a function of the seed
    stages = load_stages(args)
    sd = None
    pretrained_unet, base_config = None, None
    if args.pretrained_model_name_or_path:
        from ..pipelines import load_pipeline

        source = load_pipeline(args.pretrained_model_name_or_path)
        pretrained_unet, base_config = source.unet, dict(source.scheduler.config)
        if hasattr(source, "text_encoder"):
            sd = source
    objective, sample_scheduler, warmup = build_noise_process(args, base_config)
    if sd is not None and args.noise_process not in ("ddpm", "fdm"):
        raise ValueError("Stable Diffusion UNets train with the discrete noise processes: `--noise_process ddpm|fdm`.")
    validate_args(args, stages, objective.num_train_timesteps)
    channels = 3 if sd is not None else (pretrained_unet.config.in_channels if pretrained_unet is not None else 1)
    unet = build_unet(args, stages, objective, pretrained_unet, in_channels=channels)
    raw_ds, train_ds = build_dataset(args, channels, tokenizer=sd.tokenizer if sd is not None else None)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    if len(train_ds) < args.train_batch_size:
        raise ValueError(
            f"the dataset has {len(train_ds)} images, fewer than `--train_batch_size` {args.train_batch_size}."
        )
    fingerprint = run_fingerprint(args, unet, stages)

    if sd is not None:
        for frozen in (sd.vae, sd.text_encoder):
            frozen.requires_grad_(False).to(accelerator.device)
    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    sampler = EpochSampler(len(train_ds), args.seed)
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    ema = None
    if args.use_ema:
        ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=args.ema_decay)
        ema.to(accelerator.device)

    start_step = 0
    if args.resume_from_checkpoint:
        ckpt = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        start_step = load_checkpoint(accelerator, ckpt, fingerprint, ema, warmup)
        logger.info("resumed from %s at step %d", ckpt, start_step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        stages.save_pretrained(output_dir)
        if accelerator.trackers == [] and args.report_to != "none":
            accelerator.init_trackers("multistage", config={k: str(v) for k, v in vars(args).items()})

    weights = objective.stage_weights(stages)
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError("`--gradient_accumulation_steps` exceeds the number of batches per epoch.")
    micro = start_step * args.gradient_accumulation_steps
    batches = _batches(accelerator, loader, micro)
    bar = tqdm(
        range(args.max_train_steps), initial=start_step, desc="train", disable=not accelerator.is_local_main_process
    )
    step = start_step
    loop_start = time.perf_counter()
    while step < args.max_train_steps:
        batch = next(batches)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + micro * 1_009 + accelerator.process_index)
        micro += 1
        with accelerator.accumulate(unet):
            x0, model_kwargs = _encode_batch(batch, sd, accelerator)
            bsz = x0.shape[0]
            stage = args.train_stage
            if stage is None and args.stage_sampling == "weighted":
                stage = int(torch.multinomial(weights.float(), 1, generator=g))
            elif stage is None and args.stage_sampling == "uniform":
                stage = int(torch.randint(stages.num_stages, (1,), generator=g))
            levels = objective.sample_levels(stages, stage, bsz, g)
            noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
            losses = objective.loss(unet, x0, noise, levels, **model_kwargs)
            loss = losses.mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        if warmup is not None:
            warmup.step()
        bar.update(1)
        logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
        stage_ids = objective.stage_of(stages, levels)
        for k in stage_ids.unique().tolist():
            logs[f"loss/stage_{k}"] = losses.detach()[stage_ids.to(losses.device) == k].mean().item()
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        accelerator.log(logs, step=step)
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    accelerator,
                    output_dir / f"checkpoint-{step}",
                    step,
                    fingerprint,
                    ema,
                    warmup,
                    args.checkpoints_total_limit,
                )
        if accelerator.is_main_process and args.validation_steps and step % args.validation_steps == 0:
            _validate(args, accelerator, unet, ema, sample_scheduler, sd, stages, step)
    bar.close()
    loop_seconds = time.perf_counter() - loop_start

    accelerator.wait_for_everyone()
    metrics = {}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(final.parameters())
        pipe = make_pipeline(final, sample_scheduler, sd)
        run_info = {
            "train_seconds": loop_seconds,
            "train_steps_per_second": (step - start_step) / max(loop_seconds, 1e-9),
        }
        metrics = _finish(args, pipe, raw_ds, stages, output_dir, run_info)
    accelerator.end_training()
    return metrics


def _batches(accelerator, loader, start_micro: int):
    """Batches forever, epoch after epoch, starting ``start_micro`` micro-batches in."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_micro, per_epoch)
    while True:
        loader.set_epoch(epoch)
        it = accelerator.skip_first_batches(loader, skip) if skip else loader
        yield from it
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def _encode_batch(batch, sd, accelerator):
    pixels = batch["pixel_values"].to(accelerator.device)
    if sd is None:
        return pixels, {}
    latents = sd.vae.encode(pixels.to(sd.vae.dtype)).latent_dist.sample() * sd.vae.config.scaling_factor
    hidden = sd.text_encoder(batch["input_ids"].to(accelerator.device))[0]
    return latents, {"encoder_hidden_states": hidden}


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


def sample_images(
    pipe, n: int, num_inference_steps: int, seed: int, batch_size: int = 250, prompt: str = ""
) -> torch.Tensor:
    """``n`` samples in ``[-1, 1]`` as ``[N, C, H, W]``."""
    pipe.set_progress_bar_config(disable=True)
    out, g = [], torch.Generator().manual_seed(seed)
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        if hasattr(pipe, "text_encoder"):
            imgs = pipe([prompt] * b, num_inference_steps=num_inference_steps, generator=g, output_type="pt").images
        else:
            imgs = pipe(batch_size=b, num_inference_steps=num_inference_steps, generator=g, output_type="pt").images
        out.append(imgs.cpu() * 2 - 1)
    return torch.cat(out)


def _validate(args, accelerator, unet, ema, scheduler, sd, stages, step):
    from ..evaluation.grids import save_image_grid

    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        images = sample_images(
            make_pipeline(model, scheduler, sd), args.num_validation_images, args.num_inference_steps, args.seed
        )
    finally:
        if ema is not None:
            ema.restore(model.parameters())
        model.train()
    save_image_grid(images, Path(args.output_dir) / "validation" / f"step-{step}.png", scale=4)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", (images + 1) / 2, step)


def _finish(args, pipe, raw_ds, stages: TimestepStages, output_dir: Path, run_info: dict) -> dict:
    """Save the pipeline (model_index.json last), samples, metrics and model card."""
    from ..data import dataset_to_tensor
    from ..evaluation.classifier import ClassifierFeatureExtractor, load_or_train_classifier
    from ..evaluation.fid import fid
    from ..evaluation.grids import save_image_grid
    from ..pipelines import save_pipeline
    from ..utils import write_json

    save_pipeline(pipe, output_dir)
    stages.save_pretrained(output_dir)
    pipe.unet.eval()
    grid = sample_images(pipe, 64, args.num_inference_steps, args.seed)
    save_image_grid(grid, output_dir / "samples.png", rows=8, scale=4)
    metrics = {
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "noise_process": args.noise_process,
        "model_type": args.model_type,
        "stage_boundaries": stages.boundaries,
        "num_inference_steps": args.num_inference_steps,
        **run_info,
    }
    source = args.train_data_dir or args.dataset_name
    if args.eval_fid_samples and source in ("digits", "mnist") and "label" in raw_ds.column_names:
        classifier = load_or_train_classifier(source, progress=False)
        real = dataset_to_tensor(raw_ds, resolution=args.resolution, channels=1)
        fake = sample_images(pipe, args.eval_fid_samples, args.num_inference_steps, args.seed + 1)
        metrics["fid"] = fid(ClassifierFeatureExtractor(classifier), real, fake)
        metrics["fid_samples"] = args.eval_fid_samples
    write_json(metrics, output_dir / "metrics.json")
    _write_model_card(args, stages, metrics, output_dir, text_to_image=hasattr(pipe, "text_encoder"))
    if args.push_to_hub:
        from ..hub import push_to_hub

        push_to_hub(
            output_dir,
            args.hub_model_id,
            token=args.hub_token,
            ignore_patterns=["checkpoint-*/**", ".*", f"{args.logging_dir}/**", "validation/**"],
        )
    return metrics


def _write_model_card(args, stages, metrics, output_dir: Path, text_to_image: bool) -> None:
    from ..hub import render_model_card

    card = render_model_card(
        "multistage.md",
        tags=["multi-stage"] + (["fdm"] if "fdm" in args.noise_process else []),
        base_model=args.pretrained_model_name_or_path,
        pipeline_tag="text-to-image" if text_to_image else "unconditional-image-generation",
        text_to_image=text_to_image,
        model_type=args.model_type,
        noise_process=args.noise_process,
        stages=stages,
        metrics=metrics,
        args={k: v for k, v in vars(args).items() if k != "hub_token"},
    )
    card.save(str(output_dir / "README.md"))

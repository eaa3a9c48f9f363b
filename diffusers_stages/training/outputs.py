"""What a run leaves behind: validation grids during training; the pipeline, samples, metrics (FID) and model card
at the end, optionally pushed to the Hub."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..stages import TimestepStages
from .components import make_pipeline
from .config import TrainingConfig


def sample_images(
    pipe, n: int, num_inference_steps: int, seed: int, batch_size: int = 250, prompt: str = ""
) -> torch.Tensor:
    """``n`` samples in ``[-1, 1]`` as ``[N, C, H, W]`` (text-to-image pipelines get ``prompt``)."""
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


def save_validation_grid(config: TrainingConfig, accelerator, unet, ema, scheduler, sd, step: int) -> None:
    """Sample ``num_validation_images`` with the EMA weights (when kept) into ``validation/step-N.png`` and the
    tensorboard tracker; the training weights are restored afterwards, even on error."""
    from ..evaluation.grids import save_image_grid

    model = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        pipe = make_pipeline(model, scheduler, sd)
        images = sample_images(pipe, config.num_validation_images, config.num_inference_steps, config.seed)
    finally:
        if ema is not None:
            ema.restore(model.parameters())
        model.train()
    save_image_grid(images, Path(config.output_dir) / "validation" / f"step-{step}.png", scale=4)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", (images + 1) / 2, step)


def _fid_metrics(config: TrainingConfig, pipe, raw_ds) -> dict:
    """FID in the offline classifier's features against the dataset (digits / MNIST with labels only)."""
    from ..data import dataset_to_tensor
    from ..evaluation.classifier import ClassifierFeatureExtractor, load_or_train_classifier
    from ..evaluation.fid import fid

    source = config.train_data_dir or config.dataset_name
    if not (config.eval_fid_samples and source in ("digits", "mnist") and "label" in raw_ds.column_names):
        return {}
    classifier = load_or_train_classifier(source, progress=False)
    real = dataset_to_tensor(raw_ds, resolution=config.resolution, channels=1)
    fake = sample_images(pipe, config.eval_fid_samples, config.num_inference_steps, config.seed + 1)
    return {"fid": fid(ClassifierFeatureExtractor(classifier), real, fake), "fid_samples": config.eval_fid_samples}


def save_run_outputs(config: TrainingConfig, pipe, raw_ds, stages: TimestepStages, run_info: dict) -> dict:
    """Save the pipeline (``model_index.json`` last) with ``stages.json``, a 64-sample grid, ``metrics.json`` and the
    model card into ``config.output_dir``; push it when ``push_to_hub``. Returns the metrics."""
    from ..evaluation.grids import save_image_grid
    from ..pipelines import save_pipeline
    from ..utils import write_json

    output_dir = Path(config.output_dir)
    save_pipeline(pipe, output_dir)
    stages.save_pretrained(output_dir)
    pipe.unet.eval()
    grid = sample_images(pipe, 64, config.num_inference_steps, config.seed)
    save_image_grid(grid, output_dir / "samples.png", rows=8, scale=4)
    metrics = {
        "max_train_steps": config.max_train_steps,
        "train_batch_size": config.train_batch_size,
        "noise_process": config.noise_process,
        "model_type": config.model_type,
        "stage_boundaries": stages.boundaries,
        "num_inference_steps": config.num_inference_steps,
        **run_info,
        **_fid_metrics(config, pipe, raw_ds),
    }
    write_json(metrics, output_dir / "metrics.json")
    write_model_card(config, stages, metrics, text_to_image=hasattr(pipe, "text_encoder"))
    if config.push_to_hub:
        from ..hub import push_to_hub

        push_to_hub(
            output_dir,
            config.hub_model_id,
            token=config.hub_token,
            ignore_patterns=["checkpoint-*/**", ".*", f"{config.logging_dir}/**", "validation/**"],
        )
    return metrics


def write_model_card(config: TrainingConfig, stages: TimestepStages, metrics: dict, text_to_image: bool) -> None:
    """``README.md`` in ``config.output_dir``: the ``multistage.md`` card (the Hub token left out)."""
    from ..hub import render_model_card

    card = render_model_card(
        "multistage.md",
        tags=["multi-stage"] + (["fdm"] if "fdm" in config.noise_process else []),
        base_model=config.pretrained_model_name_or_path,
        pipeline_tag="text-to-image" if text_to_image else "unconditional-image-generation",
        text_to_image=text_to_image,
        model_type=config.model_type,
        noise_process=config.noise_process,
        fdm_m=config.fdm_multiplier,
        stages=stages,
        metrics=metrics,
        args={k: v for k, v in dataclasses.asdict(config).items() if k != "hub_token"},
    )
    card.save(str(Path(config.output_dir) / "README.md"))

"""The DeMe merge job (`merge_stages`): stage adapters -> one plain UNet -> a stock diffusers pipeline folder.

The arithmetic of the merge and of its weight search is in `diffusers_stages.deme.merging`; this module chooses the
weights, writes the folder with its record and model card, and uploads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from ..evaluation.fid import InceptionFeatureExtractor, fid
from ..hub import base_model_license, check_upload_folder, push_to_hub, render_model_card, start_hub_repo
from ..utils import atomic_directory
from .adapters import check_base_model, lora_scaling
from .config import StageMergeConfig
from .inputs import BaseComponents, encode_batch, load_training_images, load_training_scheduler
from .merging import StageDeltas, grid_search_merge_weights, heldout_denoising_loss, merge_stage_deltas


@dataclass
class StageMergeOutput(BaseOutput):
    """
    Args:
        output_dir (`str`): The merged pipeline folder.
        merge_weights (`list[float]`): The weights ``w_k`` used, stage 0 first.
        weight_source (`str`): Where they come from (given, or the grid search).
        hub_url (`str`, *optional*): The commit URL when the folder was pushed to the Hub.
    """

    output_dir: str
    merge_weights: list[float]
    weight_source: str
    hub_url: str | None = None


@torch.no_grad()
def merge_stages(config: StageMergeConfig) -> StageMergeOutput:
    r"""
    Decouple-then-Merge's merge: fuse the stages of ``config.adapters_dir`` (LoRA adapters or full-finetuning task
    vectors) into the base UNet, ``theta + sum_k w_k tau_k`` (or TIES, ``config.merge_method``), with the given
    ``merge_weights`` or the ones a grid search picks on the training device, and write a pipeline folder that stock
    diffusers loads (``model_index.json``, safetensors components, ``stages.json``, ``deme_merge.json``, a model card
    ``README.md``), atomically. The pipeline is loaded once. Uploads it when ``config.push_to_hub``.

    Args:
        config (`StageMergeConfig`): Every option of the merge.
    """
    check_merge_output_dir(config)
    config = start_hub_repo(config)  # a bad token fails before any loading
    from ..pipelines import load_pipeline  # here: pipelines imports deme (the stage LoRA switcher)

    deltas = StageDeltas.read(config.adapters_dir)
    pipe = load_pipeline(config.pretrained_model_name_or_path)
    check_base_model(pipe.unet, deltas.info)
    weights, source = choose_merge_weights(config, pipe, deltas)
    merge_stage_deltas(pipe.unet, deltas, weights, config.merge_method, config.ties_density)
    check_finite_weights(pipe.unet, config.adapters_dir)
    record = merge_record(config, deltas, weights, source)
    with atomic_directory(config.output_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        deltas.stages.save_pretrained(tmp)
        with open(os.path.join(tmp, "deme_merge.json"), "w") as f:
            json.dump(record, f, indent=2)
        card = merged_model_card(config, deltas, record, pipe)
        card.save(os.path.join(tmp, "README.md"))
        check_upload_folder(tmp)
    url = None
    if config.push_to_hub:
        url = push_to_hub(config.output_dir, config.hub_model_id, token=config.hub_token, private=config.private)
    return StageMergeOutput(config.output_dir, list(weights), source, url)


def check_merge_output_dir(config: StageMergeConfig) -> None:
    """The merge replaces ``output_dir`` as a whole, so refuse one that is a file, an input (``adapters_dir``,
    ``pretrained_model_name_or_path``, or a folder holding or inside one), or a non-empty folder that is not a
    merged pipeline (no ``deme_merge.json``) unless ``overwrite_output_dir``."""
    out = os.path.realpath(config.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"`output_dir` {config.output_dir} exists and is not a folder.")
    for name in ("adapters_dir", "pretrained_model_name_or_path"):
        source = os.path.realpath(getattr(config, name))
        if os.path.commonpath([out, source]) in (out, source):
            raise ValueError(f"`output_dir` {config.output_dir} overlaps the input `{name}` {getattr(config, name)}.")
    if not os.path.isdir(out) or not os.listdir(out) or os.path.isfile(os.path.join(out, "deme_merge.json")):
        return
    if not config.overwrite_output_dir:
        raise ValueError(
            f"`output_dir` {config.output_dir} is a non-empty folder that is not a merged pipeline; the merge would "
            "replace it. Choose another folder or pass `overwrite_output_dir`."
        )


def check_finite_weights(unet: torch.nn.Module, adapters_dir: str) -> None:
    """Refuse a merged UNet with NaN or infinite weights (a broken adapter file in ``adapters_dir``)."""
    broken = [name for name, p in unet.named_parameters() if not bool(torch.isfinite(p).all())]
    if broken:
        raise ValueError(
            f"the merged UNet has non-finite weights in {len(broken)} tensors (first: {broken[0]}): the adapters "
            f"in {adapters_dir} hold NaN or infinite values. Nothing was written."
        )


def search_device(config: StageMergeConfig) -> torch.device:
    """``config.device``, else CUDA when available, else the CPU."""
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def choose_merge_weights(config: StageMergeConfig, pipe, deltas: StageDeltas) -> tuple[list[float], str]:
    """
    The given ``merge_weights``, or the best of the grid search on ``num_heldout`` held-out samples, run on
    `search_device` with the already loaded pipeline: scored by their denoising loss at stratified timesteps
    (`heldout_denoising_loss`) or by the FID of samples against them (`sample_fid`); with a description of where
    the weights come from. The pipeline stays on the search device.
    """
    if not config.grid_search:
        return list(config.merge_weights), "given"
    device = search_device(config)
    pipe.to(device)
    base = pipeline_components(config.pretrained_model_name_or_path, pipe)
    images, captions = load_training_images(
        config.data_source, base, config.resolution, config.image_column, config.caption_column, config.num_heldout
    )
    if config.score == "fid":
        extractor = InceptionFeatureExtractor(device)
        score_fn = lambda merged: sample_fid(  # noqa: E731
            pipe, images, extractor, captions, config.num_fid_samples, config.fid_inference_steps, config.seed
        )
    else:
        x0, text = encode_batch(base, images, captions, device)
        score_fn = lambda merged: heldout_denoising_loss(  # noqa: E731
            merged, base.objective, x0, text, seed=config.seed
        )
    search = grid_search_merge_weights(
        pipe.unet, deltas, score_fn, config.grid_values, merge_method=config.merge_method,
        ties_density=config.ties_density,
    )  # fmt: skip
    return search.weights, f"grid search over {config.grid_values} on {device.type} by {SCORE_NAMES[config.score]}"


SCORE_NAMES = {"loss": "held-out denoising loss", "fid": "FID against held-out images"}


def pipeline_components(path: str, pipe) -> BaseComponents:
    """The loaded pipeline's parts as `BaseComponents` (no second copy of any model), with the training scheduler
    of ``path`` (`load_training_scheduler`: DDPM, or the base's ``FDMEDMScheduler``)."""
    return BaseComponents(
        unet=pipe.unet,
        noise_scheduler=load_training_scheduler(path),
        vae=getattr(pipe, "vae", None),
        text_encoder=getattr(pipe, "text_encoder", None),
        tokenizer=getattr(pipe, "tokenizer", None),
    )


@torch.no_grad()
def sample_fid(
    pipe,
    real: torch.Tensor,
    extractor,
    captions: list[str] | None = None,
    num_samples: int = 256,
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    r"""
    FID of ``num_samples`` images sampled with ``pipe`` (its current UNet, fixed seed, the captions of the held-out
    images cycled for a text-to-image pipeline) against the held-out images ``real`` (``[-1, 1]``).

    Args:
        pipe (`DiffusionPipeline`): The pipeline holding the merged UNet.
        real (`torch.Tensor`): Held-out images ``[N, C, H, W]`` in ``[-1, 1]``.
        extractor (`Callable`): A feature extractor (`InceptionFeatureExtractor` for the standard FID).
        captions (`list[str]`, *optional*): Prompts (text-to-image pipelines).
        num_samples (`int`, defaults to 256): Number of samples.
        num_inference_steps (`int`, defaults to 25): Sampling steps.
        seed (`int`, defaults to 0): Seed of the sampling noise (the same for every candidate).
        batch_size (`int`, defaults to 64): Sampling batch size.
    """
    g = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    samples = []
    for i in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - i)
        kwargs = (
            {"batch_size": n}
            if captions is None
            else {"prompt": [captions[(i + j) % len(captions)] for j in range(n)]}
        )
        out = pipe(generator=g, num_inference_steps=num_inference_steps, output_type="np", **kwargs).images
        samples.append(torch.as_tensor(out).permute(0, 3, 1, 2).float() * 2 - 1)
    generated = torch.cat(samples)
    if generated.shape[1] != real.shape[1]:
        generated = generated.mean(1, keepdim=True) if real.shape[1] == 1 else generated.expand(-1, 3, -1, -1)
    return fid(extractor, real, generated)


def merge_record(config: StageMergeConfig, deltas: StageDeltas, weights: list[float], source: str) -> dict:
    """The ``deme_merge.json`` record: weights, method, stages, base model and the stages' finetuning settings."""
    record = {
        "merge_weights": list(weights),
        "weight_source": source,
        "merge_method": config.merge_method,
        "ties_density": config.ties_density if config.merge_method == "ties" else None,
        "finetune": deltas.finetune,
        "stages": deltas.stages.boundaries,
        "num_train_timesteps": deltas.stages.num_train_timesteps,
        "base_model": config.pretrained_model_name_or_path,
        "base_fingerprint": deltas.info["base_fingerprint"],
    }
    if deltas.finetune == "full":
        return {**record, "task_vector_dtype": str(next(iter(deltas.taus[0].values())).dtype).split(".")[-1]}
    first = deltas.files[0]
    return {
        **record,
        "rank": first.config.r,
        "lora_alpha": first.config.lora_alpha,
        "lora_scaling": lora_scaling(first.config),
        "target_modules": sorted(first.config.target_modules),
        "channel_projection": first.channel_projection is not None,
        "train_norms_and_biases": bool(first.config.lora_bias or first.config.modules_to_save),
    }


def merged_model_card(config: StageMergeConfig, deltas: StageDeltas, record: dict, pipe):
    """The merged pipeline's model card (``model_cards/deme_merged.md``), with ``metrics_json`` if given; its usage
    snippet loads our own pipeline classes (e.g. `StageAwareImagePipeline` of a sigma-space base) with
    ``trust_remote_code``."""
    import diffusers

    is_text_to_image = hasattr(pipe, "text_encoder")
    custom = None if hasattr(diffusers, type(pipe).__name__) else type(pipe).__name__
    metrics = {}
    if config.metrics_json:
        with open(config.metrics_json) as f:
            metrics = json.load(f)
    return render_model_card(
        "deme_merged.md",
        tags=["diffusers-training", "decouple-then-merge", "lora" if deltas.finetune == "lora" else "full-finetuning"],
        base_model=config.pretrained_model_name_or_path,
        license=base_model_license(config.pretrained_model_name_or_path),
        pipeline_tag="text-to-image" if is_text_to_image else "unconditional-image-generation",
        repo_id=config.hub_model_id if config.push_to_hub else config.output_dir,
        text_to_image=is_text_to_image,
        custom_pipeline=custom,
        stages=[
            {"stage": k, "start": deltas.stages.edges[k], "end": deltas.stages.edges[k + 1], "weight": w}
            for k, w in enumerate(record["merge_weights"])
        ],
        weight_source=record["weight_source"],
        merge_method=record["merge_method"],
        finetune=record["finetune"],
        task_vector_dtype=record.get("task_vector_dtype"),
        rank=record.get("rank"),
        lora_alpha=record.get("lora_alpha"),
        target_modules=record.get("target_modules", []),
        channel_projection=record.get("channel_projection", False),
        training=deltas.info.get("training") or {},
        metrics=metrics,
    )

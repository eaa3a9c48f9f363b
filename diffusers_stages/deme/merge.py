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

from ..hub import check_upload_folder, push_to_hub, render_model_card
from ..pipelines import load_pipeline
from ..stages import TimestepStages
from ..utils import atomic_directory
from .adapters import StageAdapterFiles, lora_scaling, read_stage_adapters
from .config import StageMergeConfig
from .inputs import encode_batch, load_base_components, load_training_images
from .merging import grid_search_merge_weights, heldout_denoising_loss, merge_stage_adapters


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
    Decouple-then-Merge's merge: fuse the stage adapters of ``config.adapters_dir`` into the base UNet,
    ``W + sum_k w_k (alpha / r) B_k A_k`` for every adapted weight (`merge_stage_adapters`), with the given
    ``merge_weights`` or the ones a grid search picks on a held-out denoising loss, and write a pipeline folder that
    stock diffusers loads (``model_index.json``, safetensors components, ``stages.json``, ``deme_merge.json``, a model
    card ``README.md``), atomically. Uploads it when ``config.push_to_hub``.

    Args:
        config (`StageMergeConfig`): Every option of the merge.
    """
    stages, files = read_stage_adapters(config.adapters_dir)
    pipe = load_pipeline(config.pretrained_model_name_or_path)
    weights, source = choose_merge_weights(config, pipe.unet)
    merge_stage_adapters(pipe.unet, config.adapters_dir, weights)
    record = merge_record(config, stages, files, weights, source)
    with atomic_directory(config.output_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        stages.save_pretrained(tmp)
        with open(os.path.join(tmp, "deme_merge.json"), "w") as f:
            json.dump(record, f, indent=2)
        card = merged_model_card(config, stages, record, files, is_text_to_image=hasattr(pipe, "text_encoder"))
        card.save(os.path.join(tmp, "README.md"))
        check_upload_folder(tmp)
    url = None
    if config.push_to_hub:
        url = push_to_hub(config.output_dir, config.hub_model_id, token=config.hub_token, private=config.private)
    return StageMergeOutput(config.output_dir, list(weights), source, url)


def choose_merge_weights(config: StageMergeConfig, unet: torch.nn.Module) -> tuple[list[float], str]:
    """The given ``merge_weights``, or the best of the grid search on ``num_heldout`` held-out samples (their
    denoising loss at stratified timesteps, `heldout_denoising_loss`); with a description of where they come from."""
    if not config.grid_search:
        return list(config.merge_weights), "given"
    base = load_base_components(config.pretrained_model_name_or_path)
    images, captions = load_training_images(
        config.data_source, base, config.resolution, config.image_column, config.caption_column, config.num_heldout
    )
    x0, text = encode_batch(base, images, captions, "cpu")
    search = grid_search_merge_weights(
        unet,
        config.adapters_dir,
        lambda merged: heldout_denoising_loss(merged, base.noise_scheduler, x0, text, seed=config.seed),
        values=config.grid_values,
    )
    return search.weights, f"grid search over {config.grid_values} on a held-out denoising loss"


def merge_record(
    config: StageMergeConfig,
    stages: TimestepStages,
    files: list[StageAdapterFiles],
    weights: list[float],
    source: str,
) -> dict:
    """The ``deme_merge.json`` record: weights, stages, base model and the adapters' LoRA settings."""
    first = files[0]
    return {
        "merge_weights": list(weights),
        "weight_source": source,
        "stages": stages.boundaries,
        "num_train_timesteps": stages.num_train_timesteps,
        "base_model": config.pretrained_model_name_or_path,
        "base_fingerprint": first.info["base_fingerprint"],
        "rank": first.config.r,
        "lora_alpha": first.config.lora_alpha,
        "lora_scaling": lora_scaling(first.config),
        "target_modules": sorted(first.config.target_modules),
        "channel_projection": first.channel_projection is not None,
    }


def merged_model_card(
    config: StageMergeConfig,
    stages: TimestepStages,
    record: dict,
    files: list[StageAdapterFiles],
    is_text_to_image: bool,
):
    """The merged pipeline's model card (``model_cards/deme_merged.md``), with ``metrics_json`` if given."""
    metrics = {}
    if config.metrics_json:
        with open(config.metrics_json) as f:
            metrics = json.load(f)
    return render_model_card(
        "deme_merged.md",
        tags=["decouple-then-merge", "lora"],
        base_model=config.pretrained_model_name_or_path,
        pipeline_tag="text-to-image" if is_text_to_image else "unconditional-image-generation",
        repo_id=config.hub_model_id,
        stages=[
            {"stage": k, "start": stages.edges[k], "end": stages.edges[k + 1], "weight": w}
            for k, w in enumerate(record["merge_weights"])
        ],
        weight_source=record["weight_source"],
        rank=record["rank"],
        lora_alpha=record["lora_alpha"],
        target_modules=record["target_modules"],
        channel_projection=record["channel_projection"],
        training=files[0].info.get("training") or {},
        metrics=metrics,
    )

#!/usr/bin/env python
"""Merge per-stage LoRA adapters into one plain UNet (Decouple-then-Merge) and write a stock diffusers pipeline.

    python training/merge_stage_adapters.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
      --adapters_dir deme-lora --merge_weights 0.1 0.1 0.2 0.5 --output_dir deme-merged

    # or find the weights by grid search on a held-out denoising loss
    python training/merge_stage_adapters.py ... --grid_search --grid_values 0.25 0.5 1.0 --train_data_dir held_out

The merged folder (``model_index.json``, safetensors components, ``stages.json``, ``deme_merge.json`` and a model
card ``README.md``) loads with ``DiffusionPipeline.from_pretrained`` without this package; ``--push_to_hub`` uploads
it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from diffusers_stages.pipelines import load_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusers_stages.deme.adapters import lora_scaling, read_stage_adapters
from diffusers_stages.deme.inputs import encode_batch, load_base_components, load_training_images
from diffusers_stages.deme.merging import grid_search_merge_weights, heldout_denoising_loss, merge_stage_adapters
from diffusers_stages.hub import check_upload_folder, push_to_hub, render_model_card
from diffusers_stages.utils import atomic_directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--adapters_dir", required=True, help="output of train_stage_lora.py (stages.json + stage{k}/)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--merge_weights", type=float, nargs="+", default=None, help="w_k, stage 0 (least noisy) first")
    p.add_argument("--grid_search", action="store_true", help="choose the weights on a held-out denoising loss")
    p.add_argument("--grid_values", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--dataset_name", default=None, help="held-out data for --grid_search")
    p.add_argument("--train_data_dir", default=None, help="held-out image folder for --grid_search")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--num_heldout", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics_json", default=None, help="measured metrics to show in the model card")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    if (args.merge_weights is None) == (not args.grid_search):
        p.error("pass exactly one of --merge_weights and --grid_search")
    if args.grid_search and (args.dataset_name is None) == (args.train_data_dir is None):
        p.error("--grid_search needs exactly one of --dataset_name and --train_data_dir")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    stages, files = read_stage_adapters(args.adapters_dir)
    pipe = load_pipeline(args.pretrained_model_name_or_path)
    weights, source = args.merge_weights, "given"
    if args.grid_search:
        base = load_base_components(args.pretrained_model_name_or_path)
        images, captions = load_training_images(
            args.dataset_name or args.train_data_dir,
            base,
            args.resolution,
            args.image_column,
            args.caption_column,
            args.num_heldout,
        )
        x0, text = encode_batch(base, images, captions, "cpu")
        search = grid_search_merge_weights(
            pipe.unet,
            args.adapters_dir,
            lambda unet: heldout_denoising_loss(unet, base.noise_scheduler, x0, text, seed=args.seed),
            values=args.grid_values,
        )
        weights, source = search.weights, f"grid search over {args.grid_values} on a held-out denoising loss"
    merge_stage_adapters(pipe.unet, args.adapters_dir, weights)

    record = {
        "merge_weights": list(weights),
        "weight_source": source,
        "stages": stages.boundaries,
        "num_train_timesteps": stages.num_train_timesteps,
        "base_model": args.pretrained_model_name_or_path,
        "base_fingerprint": files[0].info["base_fingerprint"],
        "rank": files[0].config.r,
        "lora_alpha": files[0].config.lora_alpha,
        "lora_scaling": lora_scaling(files[0].config),
        "target_modules": sorted(files[0].config.target_modules),
        "channel_projection": files[0].channel_projection is not None,
    }
    metrics = {}
    if args.metrics_json:
        with open(args.metrics_json) as f:
            metrics = json.load(f)
    card = render_model_card(
        "deme_merged.md",
        tags=["decouple-then-merge", "lora"],
        base_model=args.pretrained_model_name_or_path,
        pipeline_tag="text-to-image" if hasattr(pipe, "text_encoder") else "unconditional-image-generation",
        repo_id=args.hub_model_id,
        stages=[
            {"stage": k, "start": stages.edges[k], "end": stages.edges[k + 1], "weight": w}
            for k, w in enumerate(weights)
        ],
        weight_source=source,
        rank=record["rank"],
        lora_alpha=record["lora_alpha"],
        target_modules=record["target_modules"],
        channel_projection=record["channel_projection"],
        training=files[0].info.get("training") or {},
        metrics=metrics,
    )
    with atomic_directory(args.output_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        stages.save_pretrained(tmp)
        with open(os.path.join(tmp, "deme_merge.json"), "w") as f:
            json.dump(record, f, indent=2)
        card.save(os.path.join(tmp, "README.md"))
        check_upload_folder(tmp)
    print(f"merged with weights {list(weights)} into {args.output_dir}")
    if args.push_to_hub:
        url = push_to_hub(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.private)
        print(f"pushed: {url}")
    return args.output_dir


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(sys.argv[1:])

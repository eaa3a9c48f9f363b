#!/usr/bin/env python
"""Merge per-stage LoRA adapters into one plain UNet (Decouple-then-Merge) and write a stock diffusers pipeline.

    python training/merge_stage_adapters.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
      --adapters_dir deme-lora --merge_weights 0.1 0.1 0.2 0.5 --output_dir deme-merged

    # or find the weights by grid search on a held-out denoising loss
    python training/merge_stage_adapters.py ... --grid_search --grid_values 0.25 0.5 1.0 --train_data_dir held_out

Every flag is a field of `diffusers_stages.StageMergeConfig` (``--help`` lists them with their defaults); the job is
`diffusers_stages.merge_stages`. The merged folder (``model_index.json``, safetensors components, ``stages.json``,
``deme_merge.json`` and a model card ``README.md``) loads with ``DiffusionPipeline.from_pretrained`` without this
package; ``--push_to_hub`` uploads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusers_stages.configs import parse_config
from diffusers_stages.deme import StageMergeConfig, StageMergeOutput, merge_stages


def main(argv: list[str] | None = None) -> StageMergeOutput:
    out = merge_stages(parse_config(StageMergeConfig, argv))
    print(f"merged with weights {out.merge_weights} into {out.output_dir}")
    if out.hub_url:
        print(f"pushed: {out.hub_url}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

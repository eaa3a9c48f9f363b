#!/usr/bin/env python
"""Decouple-then-Merge finetuning with one LoRA adapter per timestep stage (accelerate).

    accelerate launch training/train_stage_lora.py \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --train_data_dir my_images \\
      --num_stages 4 --rank 8 --max_train_steps 1000 --consistency_loss --prob_sampling 0.3 --output_dir deme-lora

Every flag is a field of `diffusers_stages.StageLoraConfig` (``--help`` lists them with their defaults); the run is
`diffusers_stages.train_stage_lora`. ``--stage k`` trains one stage (stages can train on different machines: copy
the ``stage{k}`` folders into one directory afterwards); ``--max_train_steps`` counts optimizer steps PER STAGE.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusers_stages.configs import parse_config
from diffusers_stages.deme import StageLoraConfig, train_stage_lora
from diffusers_stages.training.distributed import end_process_group


def main(argv: list[str] | None = None) -> str:
    return train_stage_lora(parse_config(StageLoraConfig, argv))


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    main(sys.argv[1:])
    end_process_group()

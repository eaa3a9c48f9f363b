#!/usr/bin/env python
"""Multi-stage (multi-decoder) and FDM diffusion training.

    accelerate launch training/train_multistage.py --dataset_name mnist --resolution 16 \
        --model_type multi_decoder --num_stages 3 --noise_process edm_fdm --max_train_steps 2000 \
        --output_dir outputs/mnist-multistage-fdm

Every flag: ``--help`` (the fields of `diffusers_stages.TrainingConfig`, with their defaults). The training logic
lives in ``diffusers_stages.training`` (tested there); this script only builds the config and runs it.
"""

import logging

from diffusers_stages.configs import parse_config
from diffusers_stages.training import TrainingConfig, train
from diffusers_stages.training.distributed import end_process_group

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    metrics = train(parse_config(TrainingConfig))
    end_process_group()
    if metrics:
        print({k: v for k, v in metrics.items() if k in ("fid", "max_train_steps", "noise_process", "model_type")})

#!/usr/bin/env python
"""Multi-stage (multi-decoder) and FDM diffusion training.

    accelerate launch training/train_multistage.py --dataset_name mnist --resolution 16 \
        --model_type multi_decoder --num_stages 3 --noise_process edm_fdm --max_train_steps 2000 \
        --output_dir outputs/mnist-multistage-fdm

Every flag: ``--help``. The training logic lives in ``diffusers_stages.training.trainer`` (tested there); this script only
parses the arguments and runs it.
"""

import logging

from diffusers_stages.training.trainer import parse_args, train

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    metrics = train(parse_args())
    if metrics:
        print({k: v for k, v in metrics.items() if k in ("fid", "max_train_steps", "noise_process", "model_type")})

#!/usr/bin/env python
"""Multi-stage (multi-decoder) and FDM diffusion training.

    accelerate launch training/train_multistage.py --dataset_name mnist --resolution 16 \
        --model_type multi_decoder --num_stages 3 --noise_process edm_fdm --max_train_steps 2000 \
        --output_dir outputs/mnist-multistage-fdm

Every flag: ``--help`` (the fields of `diffusers_stages.TrainingConfig`, with their defaults). The training logic
lives in ``diffusers_stages.training`` (tested there); this script is ``diffusers-stages train``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusers_stages.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("train", sys.argv[1:])

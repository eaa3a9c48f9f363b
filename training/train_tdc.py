#!/usr/bin/env python
"""TDC: two-stage divide-and-conquer training with proxy-based pruning.

    accelerate launch training/train_tdc.py --dataset_name mnist --resolution 16 --max_train_steps 2000 \
        --phase1_fraction 0.5 --num_groups 3 --prune_k 0.5 --output_dir outputs/mnist-tdc

Phase 1 trains a unified model for ``--phase1_fraction`` of the budget, the unified model groups the timesteps
(gradient similarity), phase 2 prunes one copy per group to its MAC budget and finetunes it on the group's
timesteps; the output folder is a pipeline with a `StageExpertsUNet` and ``stages.json``. Every flag: ``--help``
(the fields of `diffusers_stages.TDCConfig`: the trainer's plus the TDC ones). The logic lives in
``diffusers_stages.tdc``.
"""

import logging

from diffusers_stages.configs import parse_config
from diffusers_stages.tdc import TDCConfig, run_tdc
from diffusers_stages.training.distributed import end_process_group

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    metrics = run_tdc(parse_config(TDCConfig))
    end_process_group()
    if metrics:
        print({k: v for k, v in metrics.items() if k in ("fid", "max_train_steps", "tdc")})

#!/usr/bin/env python
"""TDC: two-stage divide-and-conquer training with proxy-based pruning.

    accelerate launch training/train_tdc.py --dataset_name mnist --resolution 16 --max_train_steps 2000 \
        --phase1_fraction 0.5 --num_groups 3 --prune_k 0.5 --output_dir outputs/mnist-tdc

Phase 1 trains a unified model for ``--phase1_fraction`` of the budget, the unified model groups the timesteps
(gradient similarity), phase 2 prunes one copy per group to its MAC budget and finetunes it on the group's
timesteps; the output folder is a pipeline with a `StageExpertsUNet` and ``stages.json``. Every flag: ``--help``
(the fields of `diffusers_stages.TDCConfig`: the trainer's plus the TDC ones). The logic lives in
``diffusers_stages.tdc``; this script is ``diffusers-stages tdc``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusers_stages.cli import run_job  # noqa: E402

if __name__ == "__main__":
    run_job("tdc", sys.argv[1:])

#!/usr/bin/env bash
# The issue-18 study at the scale a 2-core CPU affords (the figures in benchmarks/results/study.md): 16x16 MNIST,
# a 16-32-32 UNet, batch 32, 2,000 steps, one torch thread per process. Resumable: rerun to continue.
# Two shards can run at once (at most two benchmark processes on these machines), each over its own configurations:
#
#   CONFIGS="baseline edm_fdm ms_balanced ms_balanced_fdm" bash benchmarks/cpu_study.sh &
#   CONFIGS="ddpm tdc deme_lora" bash benchmarks/cpu_study.sh
#   bash benchmarks/cpu_study.sh      # afterwards: every cached run -> study.{json,md} and the plots
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SEEDS=${SEEDS:-"0 1 2"}
CONFIGS=${CONFIGS:-}
for seed in $SEEDS; do  # seed by seed, so a partial study already covers every configuration
    # shellcheck disable=SC2086
    python benchmarks/study.py ${CONFIGS:+--configs $CONFIGS} --seeds $seed \
        --steps 2000 --eval_every 250 --resolution 16 --block_out_channels 16 32 32 --batch_size 32 \
        --deme_steps 250 --threads 1 --output_dir outputs/study --results_dir benchmarks/results "$@"
done

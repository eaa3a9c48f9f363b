#!/usr/bin/env bash
# The issue-18 study scaled up for one GPU: 28x28 MNIST, a larger UNet (64-128-128), bf16, more steps.
# Meant to finish in <= 8 minutes on one H100 / H200 and to write the same files as the CPU study
# (study.{json,md}, study_fid_vs_*.png, study_samples/*.npz), into benchmarks/results/gpu/ (the CPU study's figures
# in benchmarks/results/ stay), with the device (device.txt) and the wall time (wall_time.txt) next to them.
#
# NOT RUN YET: it was written on machines without a GPU, so neither its figures nor its 8-minute budget have been
# measured. On the first GPU run, check the wall time of one (config, seed) in the log and scale STEPS / CONFIGS /
# SEEDS so the whole run fits. The study resumes: rerunning this script continues where it stopped (results cached
# per config and seed). Extra arguments go to benchmarks/study.py and win over the ones below.
#
#   bash benchmarks/gpu_study.sh                 # defaults below
#   STEPS=3000 SEEDS="0 1 2" bash benchmarks/gpu_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS=${STEPS:-2000}
EVAL_EVERY=${EVAL_EVERY:-500}
SEEDS=${SEEDS:-"0 1 2"}
CONFIGS=${CONFIGS:-"baseline edm_fdm ms_balanced ms_balanced_fdm"}
OUT=${OUT:-outputs/gpu_study}
RESULTS=${RESULTS:-benchmarks/results/gpu}
mkdir -p "$OUT" "$RESULTS"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi failed)"; } \
    > "$RESULTS/device.txt"
# shellcheck disable=SC2086
python benchmarks/study.py \
    --configs $CONFIGS --seeds $SEEDS \
    --steps "$STEPS" --eval_every "$EVAL_EVERY" \
    --resolution 28 --block_out_channels 64 128 128 --batch_size 256 --lr 2e-4 \
    --mixed_precision bf16 \
    --curve_samples 500 --final_samples 2000 --default_nfe 13 --nfe 5 7 9 13 19 \
    --output_dir "$OUT" --results_dir "$RESULTS" "$@"
echo "$SECONDS s wall for: STEPS=$STEPS SEEDS=\"$SEEDS\" CONFIGS=\"$CONFIGS\" $*" > "$RESULTS/wall_time.txt"

"""Multi-decoder training under a 2-process DDP group: optimisation steps/s of each stage-sampling mode against the
unified model in the same process group (ratio multi-decoder / unified; 1.0 = no overhead).

Modes (docs/training.md "Multiple processes"): ``stage_per_batch_weighted`` / ``stage_per_batch_uniform`` (one stage
per micro-batch, the same on every process), ``stage_per_sample`` (a stage per sample), ``stage_per_rank`` (process r
trains stage (r + i) mod K). The runs are
interleaved and repeated; medians are reported. Launches itself with torchrun (``ACCELERATE_USE_CPU=1`` without GPUs):

    python benchmarks/bench_ddp_multi_decoder.py                      # real figures (quiet machine or 2 GPUs)
    python benchmarks/bench_ddp_multi_decoder.py --steps 2 --warmup 1 --repeats 1 --resolution 8 --batch 4   # smoke

Writes benchmarks/results/ddp_multi_decoder.{json,md} (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ["unified", "stage_per_batch_weighted", "stage_per_batch_uniform", "stage_per_sample", "stage_per_rank"]


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs, or CPU processes)")
    p.add_argument("--steps", type=int, default=40, help="timed optimisation steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every mode")
    p.add_argument("--batch", type=int, default=32, help="batch per process")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--num_stages", type=int, default=2)
    p.add_argument("--dataset_name", default="digits")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_multi_decoder"))
    return p.parse_args(argv)


def _time_mode(mode: str, args, output_dir: str) -> float:
    """Steps/s of one run of ``mode`` (all processes), after ``warmup`` untimed steps."""
    from diffusers_stages.training import TrainingConfig
    from diffusers_stages.training.loop import _optimisation_steps, setup

    model = {"model_type": "unified"} if mode == "unified" else {"model_type": "multi_decoder", "stage_sampling": mode}
    config = TrainingConfig(
        dataset_name=args.dataset_name, resolution=args.resolution, train_batch_size=args.batch,
        max_train_steps=args.warmup + args.steps, num_stages=args.num_stages, report_to="none", validation_steps=0,
        checkpointing_steps=10**9, output_dir=output_dir, **model,
    )  # fmt: skip
    run = setup(config)
    steps = _optimisation_steps(run)
    for _ in range(args.warmup):
        next(steps)
    run.accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(args.steps):
        next(steps)
    run.accelerator.wait_for_everyone()
    return args.steps / (time.perf_counter() - start)


def worker(args) -> None:
    """Inside the process group: every mode ``repeats`` times, interleaved; rank 0 writes the results."""
    from accelerate import PartialState

    from diffusers_stages.training.distributed import end_process_group

    rates = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in MODES:
                rates[mode].append(_time_mode(mode, args, os.path.join(tmp, f"{mode}-{r}")))
    state = PartialState()
    if state.is_main_process:
        _write(args, rates, device=f"{state.num_processes} x {state.device.type}")
    end_process_group()


def _write(args, rates: dict, device: str) -> None:
    med = {m: statistics.median(v) for m, v in rates.items()}
    result = {
        "device": device,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "steps_per_second": rates,
        "median_steps_per_second": med,
        "ratio_to_unified": {m: med[m] / med["unified"] for m in MODES},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = [f"| {m} | {med[m]:.2f} | {med[m] / med['unified']:.2f} |" for m in MODES]
    table = ["| mode | steps/s (median) | ratio to unified |", "|---|---|---|", *rows]
    out.with_suffix(".md").write_text(f"Device: {device}; {result['settings']}\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


def launch(args, argv: list[str]) -> int:
    """Re-run this script under ``torchrun --nproc_per_node nproc`` (a gloo group on CPU without GPUs)."""
    import torch

    sys.path.insert(0, str(REPO))
    from tests.distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not torch.cuda.is_available():
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    cmd += ["--master_port", str(free_port()), __file__, *argv]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    parsed = _args()
    if "LOCAL_RANK" in os.environ:
        worker(parsed)
    else:
        sys.exit(launch(parsed, sys.argv[1:]))

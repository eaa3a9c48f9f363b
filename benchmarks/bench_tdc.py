"""TDC against a unified model at equal total training compute, on MNIST 16x16 (../shared/data/mnist).

Unified: one UNet2DModel (32-64-64, attention at the lowest level, DDPM eps, batch 64, lr 1e-3) trained for
``--steps`` steps. TDC (`diffusers_stages.tdc.run_tdc`): the same UNet trained for ``--phase1_fraction`` of the
budget, timesteps grouped by gradient similarity, one copy per group pruned to its MAC budget (linear ramp from
``k F`` to ``F``, full size at low noise) by the proxy search, each finetuned on its group's timesteps with the rest
of the budget. Compute is counted in unified-model training steps (a step of an expert with ``F_k`` MACs costs
``F_k / F``; the proxy finetunes of the search are included). Both are sampled with DDIM (``--num_inference_steps``)
and scored by FID in the features of the offline MNIST classifier against the 10,000 real images; the sampling MACs
are the mean per-step MACs over the DDIM schedule (each step routed to its expert).

    python benchmarks/bench_tdc.py      # default: 1,200-step budget, 32-64-64 UNet (not yet timed to the end)
    python benchmarks/bench_tdc.py --steps 90 --batch_size 32 --block_out_channels "16 32 32" --fid_samples 100 \
        --num_inference_steps 10 --grouping_grid_size 10 --grouping_images 32 --proxy_heldout_images 32 \
        --proxy_finetune_steps 0       # the reduced run in the README (~6 min on a loaded 2-core CPU)

Writes benchmarks/results/tdc.json (and samples PNGs next to it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from diffusers_stages.models.profiling import count_macs, count_parameters
from diffusers_stages.pipelines import StageAwareImagePipeline
from diffusers_stages.tdc import TDCConfig, run_tdc
from diffusers_stages.training import TrainingConfig, train

RESULTS = Path(__file__).parent / "results"


def sampling_macs(unet, scheduler, num_inference_steps: int, resolution: int) -> float:
    """Mean MACs of one denoiser call over the sampler's schedule (batch 1; experts routed by timestep)."""
    scheduler.set_timesteps(num_inference_steps)
    x = torch.zeros(1, unet.config.in_channels, resolution, resolution)
    return sum(count_macs(unet, x, t.reshape(1)) for t in scheduler.timesteps) / len(scheduler.timesteps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="the compute budget, in unified-model steps")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--block_out_channels", default="32 64 64", help="UNet widths, e.g. '16 32 32'")
    p.add_argument("--phase1_fraction", type=float, default=0.5)
    p.add_argument("--num_groups", type=int, default=3)
    p.add_argument("--prune_k", type=float, default=0.5)
    p.add_argument("--proxy_finetune_steps", type=int, default=1)
    p.add_argument("--width_ratio", type=float, default=0.25)
    p.add_argument("--proxy_heldout_images", type=int, default=64)
    p.add_argument("--grouping_grid_size", type=int, default=20)
    p.add_argument("--grouping_images", type=int, default=64)
    p.add_argument("--fid_samples", type=int, default=500)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(RESULTS / "tdc.json"))
    a = p.parse_args()

    common = dict(
        dataset_name="mnist",
        resolution=16,
        block_out_channels=[int(c) for c in a.block_out_channels.split()],
        noise_process="ddpm",
        train_batch_size=a.batch_size,
        learning_rate=1e-3,
        max_train_steps=a.steps,
        seed=a.seed,
        eval_fid_samples=a.fid_samples,
        num_inference_steps=a.num_inference_steps,
        report_to="none",
        checkpointing_steps=100000,
        validation_steps=0,
    )
    tdc_fields = dict(
        phase1_fraction=a.phase1_fraction,
        num_groups=a.num_groups,
        prune_k=a.prune_k,
        proxy_finetune_steps=a.proxy_finetune_steps,
        width_ratio=a.width_ratio,
        proxy_heldout_images=a.proxy_heldout_images,
        grouping_grid_size=a.grouping_grid_size,
        grouping_images=a.grouping_images,
    )
    work = Path(tempfile.mkdtemp(prefix="bench_tdc_"))
    rows, results = [], {}
    try:
        start = time.perf_counter()
        unified = train(TrainingConfig(**common, output_dir=str(work / "unified")))
        unified_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tdc = run_tdc(TDCConfig(**common, **tdc_fields, output_dir=str(work / "tdc")))
        tdc_seconds = time.perf_counter() - start
        pipes = {name: StageAwareImagePipeline.from_pretrained(work / name) for name in ("unified", "tdc")}
        macs = {
            name: sampling_macs(pipe.unet, pipe.scheduler, a.num_inference_steps, 16) for name, pipe in pipes.items()
        }
        params = {name: count_parameters(pipe.unet) for name, pipe in pipes.items()}
        info = tdc["tdc"]
        results = {
            "device": "2-core CPU (CI-class machine), torch 2.13 CPU",
            "args": vars(a),
            "unified": {
                "fid": unified["fid"],
                "compute_unified_steps": a.steps,
                "sampling_macs_per_step": macs["unified"],
                "parameters": params["unified"],
                "wall_seconds": unified_seconds,
            },
            "tdc": {
                "fid": tdc["fid"],
                "compute_unified_steps": info["compute_unified_steps"],
                "sampling_macs_per_step": macs["tdc"],
                "parameters": params["tdc"],
                "wall_seconds": tdc_seconds,
                "stage_boundaries": info["stage_boundaries"],
                "groups": info["groups"],
            },
        }
        for name in ("unified", "tdc"):
            shutil.copy(work / name / "samples.png", RESULTS / f"tdc_samples_{name}.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    u, t = results["unified"], results["tdc"]
    rows.append("| model | FID | FID ratio | train compute (unified steps) | sampling MACs / step | MAC ratio |")
    rows.append("|---|---|---|---|---|---|")
    for name, r in (("unified", u), ("TDC", t)):
        rows.append(
            f"| {name} | {r['fid']:.1f} | {r['fid'] / u['fid']:.3f} | {r['compute_unified_steps']:.0f} | "
            f"{r['sampling_macs_per_step'] / 1e6:.1f} M | {r['sampling_macs_per_step'] / u['sampling_macs_per_step']:.3f} |"
        )
    rows.append("")
    rows.append(f"TDC grouping (timesteps, stage 0 = least noisy): boundaries {t['stage_boundaries']}")
    rows.append("")
    rows.append(
        "| group | timesteps | MAC budget | MACs | widths | attention (down, mid) | train steps | pruning rounds |"
    )
    rows.append("|---|---|---|---|---|---|---|---|")
    for g in t["groups"]:
        rows.append(
            f"| {g['stage']} | {g['timesteps']} | {g['mac_budget_fraction']:.2f} | {g['macs_fraction']:.2f} | "
            f"{g['block_out_channels']} | {g['down_block_types'][-1]}, {g['add_attention']} | {g['train_steps']} | "
            f"{', '.join(g['pruning_rounds']) or '-'} |"
        )
    print("\n".join(rows))
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

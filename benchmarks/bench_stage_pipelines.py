"""Sampling time of the stage-aware Stable Diffusion pipeline with K per-stage LoRA adapters.

Three configurations of one tiny Stable Diffusion pipeline (`diffusers_stages.testing`), same prompt, seed and
scheduler (DDIM), timed as whole pipeline calls (text encoding, sampling, VAE decoding):

- ``merged``: one plain UNet (what a merged DeMe model costs: no LoRA layers at all), the baseline;
- ``fused``: K adapters, each fused into the weights at its stage boundary and restored exactly after it (the PEFT
  wrappers are taken out of the UNet for the call, so a step runs the plain UNet's modules);
- ``unfused``: K adapters applied as side branches at every step;
- ``merged_copy``: a second copy of the merged UNet, the control: its ratio to ``merged`` is how far two identical
  pipelines differ in this process (where the weights happen to lie in memory moves a call of this tiny pipeline by a
  few percent), the floor under which a whole-call ratio says nothing.

The switching work alone (everything fuse mode adds to a call: wrappers out, K fusions, restore) is also timed in
isolation, in process CPU time over many repetitions, and divided by a merged call: a low-noise estimate of the
fused ratio, since a fused step runs exactly the plain UNet's modules.

Repetitions are interleaved (the order rotates every repetition); each ratio is the median over repetitions of the
two configurations' times in that repetition (with its quartiles), so load drifts cancel. Prints a Markdown table
and writes ``benchmarks/results/stage_pipelines.json``.

    python benchmarks/bench_stage_pipelines.py            # default: K=4, 25 and 50 steps, 15 repetitions
    python benchmarks/bench_stage_pipelines.py --clock process   # CPU time: for a busy shared CPU machine
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from diffusers_stages import StageAwareStableDiffusionPipeline, StageLoraAdapters, TimestepStages
from diffusers_stages.pipelines import StageLoraSwitcher
from diffusers_stages.testing import tiny_stable_diffusion_pipeline

RESULTS = Path(__file__).parent / "results" / "stage_pipelines.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_stages", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--batch_size", type=int, default=1, help="prompts per call (with classifier-free guidance)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine's noise low)")
    p.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="wall time, or this process's CPU time (robust to other load on a shared CPU machine; CPU runs only)",
    )
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def build(num_stages: int, rank: int):
    base = tiny_stable_diffusion_pipeline()
    merged = StageAwareStableDiffusionPipeline(**{**base.components, "unet": copy.deepcopy(base.unet)})
    control = StageAwareStableDiffusionPipeline(**{**base.components, "unet": copy.deepcopy(base.unet)})
    staged = StageAwareStableDiffusionPipeline(**base.components)
    adapters = StageLoraAdapters.attach(staged.unet, TimestepStages.uniform(num_stages), rank=rank)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like adapters (PEFT initialises B = 0)
        for name, p in staged.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    staged.load_stage_adapters(adapters)
    for pipe in (merged, staged, control):
        pipe.set_progress_bar_config(disable=True)
    return merged, staged, control


def switching_seconds(staged, repeats: int) -> float:
    """
    Median process CPU time of all the work fuse mode adds to one call, alone: taking the wrappers out and saving the
    base values (`StageLoraSwitcher`), fusing each of the K stages once, and restoring everything (`close`).
    """
    times = []
    for _ in range(repeats):
        start = time.process_time()
        switcher = StageLoraSwitcher(staged.stage_adapters, "fuse")
        for k in range(staged.stage_adapters.stages.num_stages):
            switcher.activate(k)
        switcher.close()
        times.append(time.process_time() - start)
    return statistics.median(times)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over repetitions of ``a[r] / b[r]`` (both timed in the same repetition, so load drifts cancel)."""
    return statistics.median(x / y for x, y in zip(a, b))


def quartiles(a: list[float], b: list[float]) -> list[float]:
    """The first and third quartiles of the per-repetition ratios ``a[r] / b[r]``: the spread of `paired_ratio`."""
    q = statistics.quantiles([x / y for x, y in zip(a, b)], n=4)
    return [q[0], q[2]]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    merged, staged, control = build(args.num_stages, args.rank)
    prompts = ["a photo of a red square"] * args.batch_size
    configs = {
        "merged": lambda n: merged(prompts, num_inference_steps=n, output_type="np", generator=torch.manual_seed(0)),
        "fused": lambda n: staged(prompts, num_inference_steps=n, output_type="np", generator=torch.manual_seed(0)),
        "unfused": lambda n: staged(
            prompts, num_inference_steps=n, output_type="np", generator=torch.manual_seed(0), lora_mode="unfused"
        ),
        "merged_copy": lambda n: control(
            prompts, num_inference_steps=n, output_type="np", generator=torch.manual_seed(0)
        ),
    }
    switch_s = switching_seconds(staged, 5 * args.repeats)
    rows = []
    for steps in args.steps:
        for run in configs.values():  # warm-up (kernel selection, allocator)
            run(steps)
        times = {name: [] for name in configs}
        names = list(configs)
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = clock()
                configs[name](steps)
                times[name].append(clock() - start)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rows.append(
            {
                "steps": steps,
                "median_s": med,
                "times_s": times,
                "fused_over_merged": paired_ratio(times["fused"], times["merged"]),
                "unfused_over_merged": paired_ratio(times["unfused"], times["merged"]),
                "fused_over_unfused": paired_ratio(times["fused"], times["unfused"]),
                "fused_over_merged_quartiles": quartiles(times["fused"], times["merged"]),
                "control_over_merged": paired_ratio(times["merged_copy"], times["merged"]),
                "control_over_merged_quartiles": quartiles(times["merged_copy"], times["merged"]),
                "switching_s": switch_s,
                "fused_over_merged_from_switching": 1 + switch_s / med["merged"],
            }
        )
    print(
        f"\nK = {args.num_stages} adapters (rank {args.rank}), batch {args.batch_size}, {args.threads} thread(s), "
        f"{args.clock} clock\n"
    )
    print(
        "| steps | merged UNet (s) | K adapters, fused at boundaries (s) | ratio | K adapters, unfused (s) | ratio "
        "| control: a copy of the merged UNet, ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        m = row["median_s"]
        print(
            f"| {row['steps']} | {m['merged']:.3f} | {m['fused']:.3f} | {row['fused_over_merged']:.3f} "
            f"({row['fused_over_merged_quartiles'][0]:.3f}-{row['fused_over_merged_quartiles'][1]:.3f}) | "
            f"{m['unfused']:.3f} | {row['unfused_over_merged']:.3f} | {row['control_over_merged']:.3f} "
            f"({row['control_over_merged_quartiles'][0]:.3f}-{row['control_over_merged_quartiles'][1]:.3f}) |"
        )
    print(
        f"\nSwitching work alone (wrappers out, K fusions, restore; median process CPU time): {switch_s * 1e3:.1f} ms "
        "per call, i.e. fused / merged = "
        + ", ".join(f"{r['fused_over_merged_from_switching']:.4f} at {r['steps']} steps" for r in rows)
        + " (fuse mode runs the plain UNet's modules at every step, so this is all it adds)"
    )
    result = {
        "benchmark": "stage_pipelines",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")
    return result


if __name__ == "__main__":
    main()

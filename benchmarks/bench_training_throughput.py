"""Training throughput and memory.

1. Steps/s of `diffusers_stages.training.train` (accelerate, data loader, stage sampling, logging, checkpoint) against a
   minimal plain PyTorch loop on the same UNet, batch and EDM loss (target: >= 0.95).
2. Peak memory (max RSS of a fresh process) of training a K-decoder model against the unified one.

Each measurement runs in its own subprocess; the runs are interleaved and repeated, and medians are reported.

    python benchmarks/bench_training_throughput.py            # ~6 min on a 2-core CPU

Writes benchmarks/results/training_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

WORKER = r"""
import json, resource, sys, tempfile, time, torch
kind, steps, batch, res, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
from diffusers_stages.training import TrainingConfig, train
common = dict(dataset_name="mnist", max_train_samples=2048, resolution=res, train_batch_size=batch, report_to="none",
              validation_steps=0, num_inference_steps=1, noise_process="edm")
if kind == "plain":
    from diffusers import UNet2DModel
    from diffusers_stages.data import dataset_to_tensor, load_mnist_dataset
    from diffusers_stages.schedulers import FDMEDMScheduler
    x = dataset_to_tensor(load_mnist_dataset(resolution=res, max_samples=2048))
    unet = UNet2DModel(sample_size=res, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    sched = FDMEDMScheduler(variant="edm", input_scaling="baseline", noise_conditioning="index")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    def step(i):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        x0 = x[idx]
        sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
        s = sigma.view(-1, 1, 1, 1)
        noisy = x0 + s * torch.randn(x0.shape, generator=g)
        out = unet(sched.precondition_inputs(noisy, s), sched.precondition_noise(sigma)).sample
        d = sched.precondition_outputs(noisy, out, s)
        w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        loss = (w * ((d - x0) ** 2).flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step()
    for i in range(5):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sps = steps / (time.perf_counter() - t0)
else:
    extra = {} if kind == "unified" else dict(model_type="multi_decoder", num_stages=int(kind.split("-")[1]),
                                              stage_sampling="stage_per_sample" if kind.endswith("mixed") else "stage_per_batch_weighted")
    with tempfile.TemporaryDirectory() as d:
        m = train(TrainingConfig(**common, max_train_steps=steps, checkpointing_steps=steps, output_dir=d, **extra))
    sps = m["train_steps_per_second"]
print(json.dumps({"kind": kind, "steps_per_second": sps,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(kind, steps, batch, res, threads):
    out = subprocess.run(
        [sys.executable, "-c", WORKER, kind, str(steps), str(batch), str(res), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a shared, loaded machine)")
    a = p.parse_args()
    kinds = ["plain", "unified", "multi-3", "multi-3-mixed"]
    runs = {k: [] for k in kinds}
    for r in range(a.repeats):
        for k in kinds:
            runs[k].append(run(k, a.steps, a.batch_size, a.resolution, a.threads))
            print(r, runs[k][-1], flush=True)
    med = {
        k: {
            "steps_per_second": statistics.median(x["steps_per_second"] for x in v),
            "max_rss_mb": statistics.median(x["max_rss_mb"] for x in v),
        }
        for k, v in runs.items()
    }
    base, uni = med["plain"]["steps_per_second"], med["unified"]
    lines = [
        f"UNet2DModel 32-64-64 at {a.resolution}x{a.resolution}, batch {a.batch_size}, EDM loss, {a.steps} steps, "
        f"median of {a.repeats} interleaved runs:",
        "",
        "| loop | steps/s | vs plain loop | peak RSS (MB) | vs unified |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "plain": "plain PyTorch loop",
        "unified": "trainer, unified UNet",
        "multi-3": "trainer, 3 decoders, one stage per batch",
        "multi-3-mixed": "trainer, 3 decoders, per-sample stages",
    }
    for k in kinds:
        m = med[k]
        lines.append(
            f"| {labels[k]} | {m['steps_per_second']:.2f} | {m['steps_per_second'] / base:.3f} | "
            f"{m['max_rss_mb']:.0f} | {m['max_rss_mb'] / uni['max_rss_mb']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training_throughput.md").write_text(table + "\n")
    (RESULTS / "training_throughput.json").write_text(
        json.dumps({"config": vars(a), "runs": runs, "median": med}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

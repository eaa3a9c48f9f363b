"""Timestep clustering on MNIST: boundaries, speed and scaling with dataset size.

Runs the optimal-denoiser clustering (3 stages, the paper's VP-SDE, defaults: grid 200, 64 (y, eps) pairs, [0, 1] pixels, x0,
alpha 0.9, eta 2/255) on the first 1k / 2.5k / 5k / 10k images of the MNIST test set, repeats the 10k run with
other seeds, and times a naive per-query implementation of the same denoiser (the obvious float64 loop over
queries, as in the tests' oracle) on a slice of the queries, extrapolated, as the speed baseline. Also reports
the segmentation rule, the baselines, and float32 vs float64.

    PYTHONPATH=. python benchmarks/bench_clustering.py [--sizes 1000 2500 5000 10000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from diffusers_stages.clustering import NoiseSchedule, cluster_timesteps, optimal_denoiser_similarity, plot_clustering
from diffusers_stages.clustering.segmentation import grid_timesteps
from diffusers_stages.data import dataset_to_tensor, load_image_dataset

PAPER_CIFAR10 = [0.442, 0.631]
RESULTS = Path(__file__).parent / "results"


def naive_denoiser_seconds_per_query(data: torch.Tensor, num_queries: int = 64) -> float:
    """The obvious implementation: per query, all squared distances, a log-sum-exp softmax, the weighted mean."""
    y = data.reshape(len(data), -1).double()
    sigmas = NoiseSchedule.vp().sigmas[grid_timesteps(1000, 200)]
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for q in range(num_queries):
        sigma = float(sigmas[q % len(sigmas)])
        x = y[q] + sigma * torch.randn(y.shape[1], generator=g, dtype=torch.float64)
        w = torch.softmax(-((x - y) ** 2).sum(1) / (2 * sigma**2), 0)
        _ = w @ y
    return (time.perf_counter() - start) / num_queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2500, 5000, 10000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data = dataset_to_tensor(load_image_dataset("mnist"), channels=1)
    load_s = time.perf_counter() - t0
    schedule = NoiseSchedule.vp(1000)
    common = dict(noise_schedule=schedule, progress=False)

    rows = []
    for n in args.sizes:
        start = time.perf_counter()
        stages = cluster_timesteps("optimal_denoiser", 3, data=data[:n], seed=0, **common)
        seconds = time.perf_counter() - start
        rows.append({"num_images": n, "seconds": seconds, "boundaries_t": [b / 1000 for b in stages.boundaries]})
        print(f"n={n}: {seconds:.1f} s, boundaries {rows[-1]['boundaries_t']}", flush=True)

    full = data[: max(args.sizes)]
    num_queries = 200 * 64
    naive_per_query = naive_denoiser_seconds_per_query(full)
    start = time.perf_counter()
    details = cluster_timesteps("optimal_denoiser", 3, data=full, seed=0, return_details=True, **common)
    ours_s = time.perf_counter() - start
    seeds = {}
    for seed in args.seeds:
        stages = cluster_timesteps("optimal_denoiser", 3, data=full, seed=seed, **common)
        seeds[seed] = [b / 1000 for b in stages.boundaries]
    segmentation = {
        k: [
            b / 1000
            for b in cluster_timesteps(
                "optimal_denoiser", k, data=full, boundary_rule="segmentation", seed=0, **common
            ).boundaries
        ]
        for k in (3, 4)
    }
    baselines = {
        m: [b / 1000 for b in cluster_timesteps(m, 3).boundaries] for m in ("uniform", "snr", "uniform_log_snr")
    }
    # float32 (the default) against float64 on the first 1,000 images, same draws
    sims = {
        dt: optimal_denoiser_similarity(
            data[:1000], schedule, dtype=dt, generator=torch.Generator().manual_seed(0), progress=False
        )
        for dt in (torch.float32, torch.float64)
    }
    f32_f64_max_diff = float((sims[torch.float32].task_similarity - sims[torch.float64].task_similarity).abs().max())

    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_clustering(details, RESULTS / "clustering_mnist.png", title="MNIST (10k), optimal denoiser, VP-SDE, K = 3")
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "load_average_at_end": os.getloadavg(),
        "mnist_load_seconds": load_s,
        "scaling": rows,
        "full": {
            "num_images": len(full),
            "seconds": ours_s,
            "boundaries_t": [b / 1000 for b in details.stages.boundaries],
            "naive_seconds_extrapolated": naive_per_query * num_queries,
            "speedup_vs_naive": naive_per_query * num_queries / ours_s,
        },
        "seeds": seeds,
        "segmentation_rule": segmentation,
        "baselines": baselines,
        "paper_cifar10": PAPER_CIFAR10,
        "float32_vs_float64_max_similarity_diff_1k": f32_f64_max_diff,
        "S0": details.curves["S0"].tolist(),
        "S1": details.curves["S1"].tolist(),
    }
    (RESULTS / f"clustering_{args.threads}threads.json").write_text(json.dumps(report, indent=2) + "\n")

    print("\n| images | time (s) | boundaries t1, t2 |\n|---:|---:|---|")
    for r in rows:
        print(f"| {r['num_images']:,} | {r['seconds']:.1f} | {', '.join(f'{b:.3f}' for b in r['boundaries_t'])} |")
    f = report["full"]
    print(
        f"\n| implementation ({f['num_images']:,} images, 12,800 denoiser queries) | time (s) | ratio |\n|---|---:|---:|"
        f"\n| naive per-query float64 loop (extrapolated from 64 queries) | {f['naive_seconds_extrapolated']:.1f} | 1.0 |"
        f"\n| `cluster_timesteps('optimal_denoiser', 3, return_details=True)` (whole pipeline, with the [G, G] matrix) | {f['seconds']:.1f} |"
        f" {f['speedup_vs_naive']:.1f}x faster |"
    )
    print("\n| split | t1 | t2 |\n|---|---:|---:|")
    print(f"| paper, CIFAR-10 (optimal denoiser) | {PAPER_CIFAR10[0]:.3f} | {PAPER_CIFAR10[1]:.3f} |")
    for seed, b in seeds.items():
        print(f"| MNIST 10k, threshold rule (alpha 0.8), seed {seed} | {b[0]:.3f} | {b[1]:.3f} |")
    print(f"| MNIST 10k, segmentation rule, seed 0 | {segmentation[3][0]:.3f} | {segmentation[3][1]:.3f} |")
    for m, b in baselines.items():
        print(f"| {m} | {b[0]:.3f} | {b[1]:.3f} |")
    print(f"\nsegmentation K=4: {segmentation[4]}; float32 vs float64 max |dS| (1k): {f32_f64_max_diff:.2e}")
    print(f"MNIST loading: {load_s:.1f} s; load average at end: {report['load_average_at_end']}")


if __name__ == "__main__":
    main()

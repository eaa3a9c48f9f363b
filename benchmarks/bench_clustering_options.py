"""Optimal-denoiser boundaries on MNIST per (pixel_range, space, alpha): the measurement behind the defaults.

For each pixel range (the paper's ``[0, 1]``, our models' ``[-1, 1]``) and comparison space (clean images ``x0``,
noise ``epsilon`` as in the authors' code), measures ``S0`` / ``S1`` once (3 stages, the paper's VP-SDE, grid 200,
64 ``(y, eps)`` pairs, eta 2/255, seed 0) and applies the two-threshold rule for each ``alpha``.

    PYTHONPATH=. python benchmarks/bench_clustering_options.py [--num_images 10000] [--alphas 0.7 0.75 0.8 0.85 0.9]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusers_stages.clustering import NoiseSchedule, optimal_denoiser_similarity, threshold_boundaries
from diffusers_stages.clustering.segmentation import grid_edges
from diffusers_stages.data import dataset_to_tensor, load_image_dataset

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=10000)
    parser.add_argument("--grid_size", type=int, default=200)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.7, 0.75, 0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--output", default=str(RESULTS / "clustering_options_mnist.json"))
    args = parser.parse_args()
    data = dataset_to_tensor(load_image_dataset("mnist", max_samples=args.num_images), channels=1)
    edges = grid_edges(1000, args.grid_size)
    rows = []
    for pixel_range in ("[0, 1]", "[-1, 1]"):
        for space in ("x0", "epsilon"):
            start = time.perf_counter()
            out = optimal_denoiser_similarity(
                data,
                NoiseSchedule.vp(1000),
                grid_size=args.grid_size,
                num_samples=args.num_samples,
                pixel_range=pixel_range,
                space=space,
                pairwise=False,
                generator=torch.Generator().manual_seed(0),
                progress=False,
            )
            for alpha in args.alphas:
                try:
                    cells = threshold_boundaries(out.S0, out.S1, alpha)
                    bounds = [edges[c] / 1000 for c in cells]
                except ValueError:
                    bounds = None
                rows.append({"pixel_range": pixel_range, "space": space, "alpha": alpha, "boundaries_t": bounds})
                print(f"{pixel_range:8s} {space:8s} alpha {alpha:.2f}: {bounds}", flush=True)
            print(f"  ({time.perf_counter() - start:.0f} s; max S1 {float(out.S1.max()):.3f})", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"num_images": len(data), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

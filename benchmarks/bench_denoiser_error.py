"""Where a trained sigma-space model denoises badly: its clean-image error per noise level, and its samples.

For each saved pixel pipeline (an `FDMEDMScheduler` model, e.g. a study run's ``train/`` folder) and each ``sigma``:
the network input's std and the mean squared error ``|D(x0 + sigma eps; sigma) - x0|^2`` per pixel over MNIST test
images (the data's variance is what predicting the mean scores); then the share of noise-like samples (mean absolute
difference of vertically adjacent pixels above 0.25 on ``[0, 1]``; clean digits score about 0.1) at a few step counts.
Written for the study's VP-FDM failure (docs/benchmarks.md). Deterministic (fixed seeds), so the load does not matter.

Usage: ``python benchmarks/bench_denoiser_error.py outputs/study/runs/vp/seed0/train outputs/study/runs/vp_fdm/seed0/train``
"""

from __future__ import annotations

import argparse

import torch

from diffusers_stages import StageAwareImagePipeline
from diffusers_stages.data import dataset_to_tensor, load_mnist_dataset

SIGMAS = [0.01, 0.2, 1.0, 3.0, 10.0, 20.0, 40.0, 60.0, 80.0]


@torch.no_grad()
def denoiser_errors(pipe, x0: torch.Tensor, sigmas: list[float], seed: int = 0) -> list[dict]:
    """``{sigma, input_std, mse}`` per sigma: ``mse = mean |D(x0 + sigma eps; sigma) - x0|^2``."""
    unet, sched, g = pipe.unet.eval(), pipe.scheduler, torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        s = torch.full((len(x0),), float(sigma))
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        model_in = sched.precondition_inputs(x, s)
        denoised = sched.precondition_outputs(x, unet(model_in, sched.precondition_noise(s)).sample, s)
        rows.append(dict(sigma=sigma, input_std=model_in.std().item(), mse=((denoised - x0) ** 2).mean().item()))
    return rows


def noisy_share(pipe, steps: int, num_images: int, seed: int = 1) -> float:
    """The share of samples whose mean absolute vertical pixel difference exceeds 0.25 (noise, not a digit)."""
    images = pipe(
        batch_size=num_images, num_inference_steps=steps, generator=torch.manual_seed(seed), output_type="np"
    )
    img = torch.from_numpy(images.images)
    return ((img[:, 1:] - img[:, :-1]).abs().mean(dim=(1, 2, 3)) > 0.25).float().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="Saved pixel pipelines with an FDMEDMScheduler.")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--steps", type=int, nargs="+", default=[7, 18, 40])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x0 = dataset_to_tensor(load_mnist_dataset(resolution=args.resolution, max_samples=args.images), channels=1)
    print(f"data variance per pixel: {x0.var().item():.3f}")
    for folder in args.folders:
        pipe = StageAwareImagePipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        print(f"\n## {folder} ({pipe.scheduler.config.variant}, input scaling {pipe.scheduler.config.input_scaling})")
        print("| sigma | network input std | x0 MSE |\n|---|---|---|")
        for row in denoiser_errors(pipe, x0, SIGMAS):
            print(f"| {row['sigma']:g} | {row['input_std']:.3f} | {row['mse']:.4f} |")
        shares = ", ".join(f"{s} steps {noisy_share(pipe, s, 64):.2f}" for s in args.steps)
        print(f"noise-like samples (of 64): {shares}")


if __name__ == "__main__":
    main()

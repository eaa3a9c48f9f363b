"""
FDM vs baseline input scaling, trained and sampled in one run (same model, data, seed, steps and NFE).

Configurations (all a `tiny_unet_2d`, Adam lr 1e-3, batch 64, 25 NFE at sampling):

- ``ddpm``            discrete VP, eps-prediction, DDPM input (`FDMDDIMScheduler(input_scaling="baseline")`), DDIM 25
- ``fdm-ddim``        the same with FDM input scaling and the calibrated kernel (the default: k_{T-1} = 1)
- ``fdm-ddim-naive``  FDM with tau = 1 at the top of the schedule (sigma_max = sigma_{T-1}): the input vanishes there
- ``edm``             sigma space, EDM preconditioning, log-normal sigmas, Heun 13 steps (25 NFE)
- ``edm-fdm``         the same with c_in = s(sigma) and the loss-weight warm-up (5 -> 500)

FID is computed in the features of the project's offline digit classifier (not comparable with Inception FIDs).
Prints a Markdown table and writes ``benchmarks/results/bench_fdm_schedulers.json``.

    python benchmarks/bench_fdm_schedulers.py            # default: digits 8x8, 600 steps, 1 seed
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusers_stages import (
    ClassifierFeatureExtractor,
    FDMDDIMScheduler,
    FDMEDMScheduler,
    FDMLossWarmup,
    dataset_to_tensor,
    fid,
    load_image_dataset,
    load_or_train_classifier,
)
from diffusers_stages.testing import tiny_unet_2d

CONFIGS = ["ddpm", "fdm-ddim", "fdm-ddim-naive", "edm", "edm-fdm"]
NFE = 25


def make_scheduler(name: str):
    if name == "ddpm":
        return FDMDDIMScheduler(input_scaling="baseline", timestep_spacing="trailing")
    if name == "fdm-ddim":
        return FDMDDIMScheduler(timestep_spacing="trailing")
    if name == "fdm-ddim-naive":
        top = float(FDMDDIMScheduler().process.sigmas[-1])
        return FDMDDIMScheduler(timestep_spacing="trailing", sigma_max=top)
    scaling = "fdm" if name == "edm-fdm" else "baseline"
    return FDMEDMScheduler(input_scaling=scaling, noise_conditioning="index", solver="heun")


def training_loss(name, unet, scheduler, x0, warmup, generator):
    eps = torch.randn(x0.shape, generator=generator)
    if isinstance(scheduler, FDMDDIMScheduler):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        return torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, eps, t), t).sample, eps)
    # EDM: ln sigma ~ N(-1.2, 1.2^2), loss weight lambda(sigma), clamped by the warm-up for FDM
    sigma = (torch.randn(len(x0), generator=generator) * 1.2 - 1.2).exp()
    x = scheduler.add_noise(x0, eps, sigmas=sigma)
    out = unet(scheduler.precondition_inputs(x, sigma), scheduler.precondition_noise(sigma)).sample
    weight = scheduler.loss_weight(sigma)
    if warmup is not None:
        weight = warmup(weight)
    per_sample = ((scheduler.precondition_outputs(x, out, sigma) - x0) ** 2).flatten(1).mean(1)
    return (weight * per_sample).mean()


@torch.no_grad()
def sample(unet, scheduler, n, shape, generator, batch_size=250):
    steps = NFE if isinstance(scheduler, FDMDDIMScheduler) else (NFE + 1) // 2
    out = []
    for start in range(0, n, batch_size):
        scheduler.set_timesteps(steps)
        x = torch.randn((min(batch_size, n - start), *shape), generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def run(name, data, steps, batch_size, seed, eval_samples, extractor):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    unet, scheduler = tiny_unet_2d(sample_size=data.shape[-1], seed=seed), make_scheduler(name)
    warmup = FDMLossWarmup(5.0, 500.0, warmup_steps=200) if name == "edm-fdm" else None
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    losses = []
    for _ in tqdm(range(steps), desc=f"{name} seed {seed}", leave=False):
        x0 = data[torch.randint(0, len(data), (batch_size,), generator=gen)]
        loss = training_loss(name, unet, scheduler, x0, warmup, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if warmup is not None:
            warmup.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    unet.eval()
    t0 = time.perf_counter()
    images = sample(unet, scheduler, eval_samples, data.shape[1:], torch.Generator().manual_seed(1000 + seed))
    return {
        "config": name,
        "seed": seed,
        "fid": fid(extractor, data, images),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_s": train_s,
        "sample_s": time.perf_counter() - t0,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help='"digits" (8x8, embedded) or "mnist" (16x16)')
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval_samples", type=int, default=500)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_fdm_schedulers.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    resolution = 8 if args.dataset == "digits" else 16
    data = dataset_to_tensor(load_image_dataset(args.dataset), resolution=resolution, channels=1)
    extractor = ClassifierFeatureExtractor(load_or_train_classifier(args.dataset))
    rows = [
        run(name, data, args.steps, args.batch_size, seed, args.eval_samples, extractor)
        for seed in args.seeds
        for name in args.configs
    ]

    base_fid = {r["seed"]: r["fid"] for r in rows if r["config"] == "ddpm"}
    base_edm = {r["seed"]: r["fid"] for r in rows if r["config"] == "edm"}
    print(f"\n{args.dataset} {resolution}x{resolution}, {args.steps} steps, batch {args.batch_size}, {NFE} NFE")
    print("| config | seed | FID | FID / baseline | final loss | train s | sample s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = (base_edm if r["config"].startswith("edm") else base_fid).get(r["seed"])
        r["fid_ratio_to_baseline"] = r["fid"] / base if base else None
        ratio = f"{r['fid_ratio_to_baseline']:.2f}" if base else "-"
        print(
            f"| {r['config']} | {r['seed']} | {r['fid']:.1f} | {ratio} | {r['final_loss']:.4f} | "
            f"{r['train_s']:.0f} | {r['sample_s']:.1f} |"
        )
    result = {
        "args": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Decouple-then-Merge with LoRA on 16x16 MNIST: pretrained vs before-merge (stage-aware) vs merged.

    python benchmarks/bench_deme_lora.py                       # default run (~10 min on 2 CPU cores)
    python benchmarks/bench_deme_lora.py --lora_steps 400      # longer finetuning

Pretrains a small pixel `UNet2DModel` (DDPM eps, cached under ``--output_dir``), finetunes one LoRA adapter per
uniform timestep group (K = 4), picks the merge weights by grid search on a held-out denoising loss, merges, and
reports FID (offline MNIST classifier features, DDIM), held-out loss, sampling speed of merged vs pretrained, and the
cost of training K adapters in one run vs one adapter. Prints a Markdown table and writes
``benchmarks/results/deme_lora.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_stages import (
    ClassifierFeatureExtractor,
    StageLoraAdapters,
    TimestepStages,
    dataset_to_tensor,
    deme_training_step,
    fid,
    grid_search_merge_weights,
    heldout_denoising_loss,
    load_image_dataset,
    load_or_train_classifier,
    merge_stage_adapters,
    save_image_grid,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def train_full(unet: UNet2DModel, data: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, desc: str):
    """Plain DDPM eps training of every parameter (the pretraining, and the equal-steps control)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=desc):
        x0 = data[torch.randint(0, len(data), (batch_size,), generator=g)]
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (batch_size,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


def pretrain(data: torch.Tensor, steps: int, batch_size: int, lr: float, folder: Path) -> None:
    from diffusers_stages.testing import tiny_unet_2d

    if (folder / "model_index.json").exists():
        print(f"using the cached pretrained model in {folder}")
        return
    unet = train_full(tiny_unet_2d(sample_size=16), data, steps, batch_size, lr, 0, "pretrain")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)


def train_adapters(unet, stages, data, args, train_stages, steps):
    """Round-robin DeMe finetuning of ``train_stages`` (one optimizer per stage); returns adapters, seconds, bytes."""
    unet.requires_grad_(False)
    adapters = StageLoraAdapters.attach(unet, stages, rank=args.rank, target_modules=TARGETS)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opts = {k: torch.optim.AdamW(adapters.parameters(k), lr=args.lora_lr) for k in train_stages}
    gens = {k: torch.Generator().manual_seed(1000 + k) for k in train_stages}
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"DeMe LoRA x{len(train_stages)}"):
        for k in train_stages:
            x0 = data[torch.randint(0, len(data), (args.batch_size,), generator=gens[k])]
            out = deme_training_step(
                unet, adapters, scheduler, x0, k, gens[k], None, args.prob_sampling, args.consistency_loss
            )
            opts[k].zero_grad()
            out.loss.backward()
            opts[k].step()
    seconds = time.perf_counter() - start
    state_bytes = sum(
        t.numel() * t.element_size()
        for k in train_stages
        for p in adapters.parameters(k)
        for t in [p, *opts[k].state[p].values()]
        if torch.is_tensor(t)
    )
    return adapters, seconds, state_bytes


@torch.no_grad()
def sample(unet, n, steps, seed, adapters=None, batch_size=250) -> tuple[torch.Tensor, float]:
    """DDIM (eta 0); with ``adapters``, stage-aware: the adapter of each step's stage is active."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    out, start = [], time.perf_counter()
    for i in range(0, n, batch_size):
        x = torch.randn((min(batch_size, n - i), 1, 16, 16), generator=g)
        for t in sched.timesteps:
            if adapters is not None:
                adapters.set_stage(int(adapters.stages.stage_index(t)))
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="benchmarks/outputs/deme_lora")
    p.add_argument("--results", default="benchmarks/results/deme_lora.json")
    p.add_argument("--pretrain_steps", type=int, default=1500)
    p.add_argument("--lora_steps", type=int, default=150, help="optimizer steps per stage")
    p.add_argument("--timing_steps", type=int, default=20, help="steps of the K-vs-1 adapter cost measurement")
    p.add_argument("--num_stages", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora_lr", type=float, default=1e-3)
    p.add_argument("--prob_sampling", type=float, default=0.3)
    p.add_argument("--consistency_loss", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--grid", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--heldout", type=int, default=256, help="held-out images for the merge-weight search")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--inference_steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)

    images = dataset_to_tensor(load_image_dataset("mnist"), resolution=16, channels=1)
    train, heldout, real = images[:8000], images[8000 : 8000 + args.heldout], images[8000:]
    stages = TimestepStages.uniform(args.num_stages)
    pretrain(train, args.pretrain_steps, args.batch_size, args.lr, out / "pretrained")
    load = lambda: UNet2DModel.from_pretrained(out / "pretrained" / "unet").eval()  # noqa: E731

    # cost of K adapters in one run vs one adapter (same number of steps per adapter)
    _, t_one, bytes_one = train_adapters(load(), stages, train, args, [0], args.timing_steps)
    _, t_all, bytes_all = train_adapters(load(), stages, train, args, list(range(args.num_stages)), args.timing_steps)

    unet = load()
    adapters, t_train, _ = train_adapters(unet, stages, train, args, list(range(args.num_stages)), args.lora_steps)
    adapters.save_pretrained(out / "adapters")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    search = grid_search_merge_weights(
        load(), out / "adapters", lambda m: heldout_denoising_loss(m, scheduler, heldout, seed=1), values=args.grid
    )
    merged = merge_stage_adapters(load(), out / "adapters", search.weights)
    DDPMPipeline(unet=merged, scheduler=scheduler).save_pretrained(out / "merged")

    pretrained = load()
    # control: the same number of extra optimizer steps (K x lora_steps) spent on plain full finetuning
    control = train_full(
        load().train(), train, args.num_stages * args.lora_steps, args.batch_size, args.lora_lr, 1, "control"
    )
    loss = {
        name: heldout_denoising_loss(m, scheduler, heldout, seed=2)
        for name, m in [("pretrained", pretrained), ("full finetune, same steps", control), ("DeMe merged", merged)]
    }
    extractor = ClassifierFeatureExtractor(load_or_train_classifier("mnist", resolution=16))
    rows = {}
    models = [
        ("pretrained", pretrained, None),
        ("full finetune, same steps (control)", control, None),
        ("DeMe before merge (stage-aware)", unet, adapters),
        ("DeMe merged", merged, None),
    ]
    for name, model, ad in models:
        x, secs = sample(model, args.num_samples, args.inference_steps, seed=123, adapters=ad)
        save_image_grid(x[:64], out / f"samples_{name.split(' (')[0].replace(' ', '_').replace(',', '')}.png", 8, 2)
        rows[name] = {"fid": fid(extractor, real, x), "sampling_seconds": secs}
    base_secs = rows["pretrained"]["sampling_seconds"]
    for r in rows.values():
        r["sampling_time_ratio"] = r["sampling_seconds"] / base_secs

    results = {
        "machine": f"2-core CPU (CI-class machine), torch {torch.__version__}, {platform.processor() or 'cpu'}",
        "args": vars(args),
        "stages": stages.boundaries,
        "merge_weights": search.weights,
        "merge_search": search.results,
        "heldout_loss": loss,
        "models": rows,
        "lora_training_seconds_all_stages": t_train,
        "adapter_cost": {
            "timing_steps": args.timing_steps,
            "one_adapter_seconds": t_one,
            "k_adapters_seconds": t_all,
            "time_ratio": t_all / t_one,
            "one_adapter_state_bytes": bytes_one,
            "k_adapters_state_bytes": bytes_all,
            "state_ratio": bytes_all / bytes_one,
            "base_model_bytes": sum(p.numel() * p.element_size() for p in pretrained.parameters()),
        },
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2))

    print("\n| model | FID (classifier features) | sampling time (s) | ratio vs pretrained |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fid']:.1f} | {r['sampling_seconds']:.2f} | {r['sampling_time_ratio']:.2f} |")
    c = results["adapter_cost"]
    print(f"\nmerge weights {search.weights}; held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    print(
        f"\n| adapters in one run | s / {args.timing_steps} steps per adapter | trainable + Adam state (MB) |\n|---|---|---|\n"
        f"| 1 | {t_one:.1f} | {bytes_one / 2**20:.2f} |\n| {args.num_stages} | {t_all:.1f} | {bytes_all / 2**20:.2f} |"
    )
    print(f"base model: {c['base_model_bytes'] / 2**20:.2f} MB (shared by all adapters)")


if __name__ == "__main__":
    main()

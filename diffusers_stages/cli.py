"""The ``diffusers-stages`` command. Each subcommand registers itself in ``COMMANDS``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_RUNS = {
    "baseline": dict(model_type="unified", noise_process="edm"),
    "multistage_fdm": dict(
        model_type="multi_decoder",
        num_stages=3,
        noise_process="edm_fdm",
        decoder_block_out_channels="32,64,64;32,64,64;16,32,32",
    ),
}


def _demo_config(args: argparse.Namespace, name: str):
    """The `TrainingConfig` of demo run ``name``: the demo's data, budget and seed, EMA, one final checkpoint."""
    from .training import TrainingConfig

    return TrainingConfig(
        dataset_name=args.dataset,
        resolution=args.resolution,
        max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        num_inference_steps=args.num_inference_steps,
        eval_fid_samples=args.fid_samples,
        checkpointing_steps=args.max_train_steps,
        checkpoints_total_limit=1,
        validation_steps=0,
        use_ema=True,
        ema_decay=0.995,
        seed=args.seed,
        output_dir=str(Path(args.output_dir) / name),
        overwrite_output_dir=args.overwrite_output_dir,
        report_to="tensorboard",
        **DEMO_RUNS[name],
    )


def _demo(args: argparse.Namespace) -> int:
    """The main job: train a unified EDM baseline and a multi-stage FDM model on the same data and budget, then
    sample both, and write a side-by-side grid, an FID table (offline classifier features) and the pipelines."""
    import torch
    from PIL import Image, ImageDraw

    from .training import train
    from .utils import write_json

    out = Path(args.output_dir)
    configs = {name: _demo_config(args, name) for name in DEMO_RUNS}  # all checked before the first run
    rows = {}
    for name, config in configs.items():
        print(f"== training {name} ({args.max_train_steps} steps on {args.dataset}) ==", flush=True)
        torch.manual_seed(args.seed)
        rows[name] = train(config)
    grids = [Image.open(out / name / "samples.png").convert("RGB") for name in DEMO_RUNS]
    w, h = grids[0].size
    canvas = Image.new("RGB", (len(grids) * w + (len(grids) - 1) * 8, h + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, grid) in enumerate(zip(DEMO_RUNS, grids)):
        canvas.paste(grid, (i * (w + 8), 20))
        fid_text = f"  FID {rows[name]['fid']:.1f}" if "fid" in rows[name] else ""
        draw.text((i * (w + 8) + 4, 4), f"{name}{fid_text}", fill="black")
    canvas.save(out / "comparison.png")
    table = ["| model | noise process | decoders | steps | FID (classifier features) |", "|---|---|---|---|---|"]
    for name, m in rows.items():
        decoders = len(m["stage_boundaries"]) + 1 if m["model_type"] == "multi_decoder" else 1
        table.append(
            f"| {name} | {m['noise_process']} | {decoders} | {m['max_train_steps']} | {m.get('fid', float('nan')):.2f} |"
        )
    (out / "results.md").write_text("\n".join(table) + "\n")
    write_json(rows, out / "results.json")
    print("\n".join(table))
    print(f"side-by-side samples: {out / 'comparison.png'}; pipelines: {out / 'baseline'}, {out / 'multistage_fdm'}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: baseline vs multi-stage FDM on the embedded digits, offline")
    p.add_argument("--dataset", default="digits", help="'digits' (embedded), 'mnist', or a path")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--max_train_steps", type=int, default=600)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--num_inference_steps", type=int, default=18)
    p.add_argument("--fid_samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument(
        "--overwrite_output_dir", action="store_true", help="train over the runs of an earlier demo in --output_dir"
    )
    p.set_defaults(func=_demo)


# the methods of `diffusers_stages.clustering.CLUSTERING_METHODS` (kept here so that `--help` does not import torch)
CLUSTER_METHODS = ("optimal_denoiser", "uniform", "snr", "gradient", "uniform_log_snr", "gradient_difficulty")
DATA_METHODS = ("optimal_denoiser", "gradient", "gradient_difficulty")
MODEL_METHODS = ("gradient", "gradient_difficulty")
DEFAULT_GRID_SIZES = {"optimal_denoiser": 200, "gradient": 100, "gradient_difficulty": 50}


def _cluster(args: argparse.Namespace) -> int:
    """Cluster the training timesteps of a dataset into stages; write ``stages.json`` and a PNG."""
    import torch

    from .clustering import NoiseSchedule, cluster_timesteps, encode_latents, plot_clustering
    from .data import dataset_to_tensor, load_image_dataset
    from .utils import write_json

    out = Path(args.output_dir)
    if args.scheduler_config:
        schedule = NoiseSchedule.from_scheduler(args.scheduler_config)
    else:
        schedule = NoiseSchedule.vp(args.num_train_timesteps, beta_min=args.beta_min, beta_max=args.beta_max)
    data, model = None, None
    if args.method in DATA_METHODS:
        ds = load_image_dataset(args.dataset, resolution=args.resolution, max_samples=args.max_samples)
        data = dataset_to_tensor(ds, channels=args.channels)
        if args.vae:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.vae_subfolder)
            data = encode_latents(vae, data)
    if args.method in MODEL_METHODS:
        if not args.model:
            raise ValueError(f"`--model` (a UNet2DModel folder) is required for `--method {args.method}`.")
        from diffusers import UNet2DModel

        model = UNet2DModel.from_pretrained(args.model, subfolder=args.model_subfolder)
    options = {}
    if args.method in DATA_METHODS:
        options["grid_size"] = args.grid_size or DEFAULT_GRID_SIZES[args.method]
    if args.method == "optimal_denoiser":
        options.update(
            alpha=args.alpha,
            eta=args.eta,
            num_samples=args.num_samples,
            boundary_rule=args.boundary_rule,
            data_range=args.data_range,
            pixel_range=args.pixel_range or ("[-1, 1]" if args.vae else "[0, 1]"),
            space=args.space,
        )
    if args.method == "gradient_difficulty":
        options.update(difficulty_weight=args.difficulty_weight, difficulty=args.difficulty)
    result = cluster_timesteps(
        args.method,
        args.num_stages,
        data=data,
        noise_schedule=schedule,
        model=model,
        seed=args.seed,
        return_details=True,
        **options,
    )
    stages = result.stages
    stages.save_pretrained(out)
    plot_clustering(result, out / "clustering.png")
    report = {
        "method": args.method,
        "dataset": args.dataset,
        "num_samples_in_dataset": None if data is None else len(data),
        "noise_schedule": schedule.name,
        "boundaries": stages.boundaries,
        "boundaries_t": [b / stages.num_train_timesteps for b in stages.boundaries],
        "boundaries_sigma": stages.sigma_boundaries(schedule.sigmas),
        "grid_timesteps": result.grid_timesteps.tolist(),
        "curves": {k: torch.as_tensor(v).tolist() for k, v in result.curves.items()},
    }
    write_json(report, out / "clustering.json")
    print(f"{args.method}: boundaries {stages.boundaries} (t = {report['boundaries_t']}) -> {out / 'stages.json'}")
    return 0


def _add_cluster(sub) -> None:
    p = sub.add_parser("cluster", help="divide the training timesteps into stages (writes stages.json and a PNG)")
    p.add_argument("--dataset", default="digits", help="'digits' (embedded), 'mnist', or a path")
    p.add_argument(
        "--method",
        default="optimal_denoiser",
        choices=CLUSTER_METHODS,
        help="the paper's: optimal_denoiser, uniform, snr, gradient (as the authors' code); ours: uniform_log_snr, "
        "gradient_difficulty (the TDC grouping)",
    )
    p.add_argument("--num_stages", type=int, default=3)
    p.add_argument("--scheduler_config", default=None, help="a diffusers scheduler config (file or folder)")
    p.add_argument("--num_train_timesteps", type=int, default=1000, help="grid of the default VP-SDE schedule")
    p.add_argument("--beta_min", type=float, default=0.1, help="VP-SDE beta_min (without --scheduler_config)")
    p.add_argument("--beta_max", type=float, default=20.0, help="VP-SDE beta_max (without --scheduler_config)")
    p.add_argument("--resolution", type=int, default=None, help="resize images (required for mixed sizes)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="force grayscale (1) or RGB (3)")
    p.add_argument("--max_samples", type=int, default=None, help="use only the first N images")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder: cluster its latents instead of pixels")
    p.add_argument("--vae_subfolder", default=None)
    p.add_argument("--model", default=None, help="UNet2DModel folder, for --method gradient / gradient_difficulty")
    p.add_argument("--model_subfolder", default=None)
    p.add_argument(
        "--grid_size",
        type=int,
        default=None,
        help="timesteps measured (200 optimal_denoiser, 100 gradient, 50 gradient_difficulty)",
    )
    p.add_argument("--num_samples", type=int, default=64, help="(y, eps) pairs per timestep (optimal_denoiser)")
    p.add_argument("--alpha", type=float, default=0.9, help="threshold of the two-threshold rule")
    p.add_argument("--eta", type=float, default=2 / 255, help="agreement tolerance on the [0, 1] scale")
    p.add_argument("--data_range", type=float, default=2.0, help="width of the data range (2 for [-1, 1])")
    p.add_argument(
        "--pixel_range",
        default=None,
        choices=["[0, 1]", "[-1, 1]"],
        help="scale the denoiser runs on: [0, 1] (the paper's; default for pixels) or [-1, 1] (default with --vae)",
    )
    p.add_argument(
        "--space", default="x0", choices=["x0", "epsilon"], help="compare clean-image or noise (authors') predictions"
    )
    p.add_argument("--boundary_rule", default="auto", choices=["auto", "threshold", "segmentation"])
    p.add_argument(
        "--difficulty_weight", type=float, default=0.5, help="weight of the difficulty (gradient_difficulty)"
    )
    p.add_argument("--difficulty", default="loss", choices=["loss", "snr"], help="difficulty (gradient_difficulty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/cluster")
    p.set_defaults(func=_cluster)


COMMANDS = [_add_demo, _add_cluster]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffusers-stages", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

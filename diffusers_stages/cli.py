"""Train, divide, merge and compare timestep-staged diffusion models (Hugging Face diffusers).

Every job is also a script in the repository's training/ folder, with the same flags; `diffusers-stages JOB --help`
lists them with their defaults. Multi-GPU: `accelerate launch -m diffusers_stages.cli JOB ...`.

examples:
  diffusers-stages cluster --method optimal_denoiser --num_stages 3 --output_dir outputs/stages
  accelerate launch -m diffusers_stages.cli train --dataset_name mnist --model_type multi_decoder \\
      --num_stages 3 --noise_process edm_fdm --output_dir outputs/mnist-fdm
  diffusers-stages demo --max_train_steps 600
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__


@dataclass(frozen=True)
class Job:
    """
    A subcommand that runs one config-driven job; its flags are the fields of the config dataclass
    (`diffusers_stages.configs.config_parser`), exactly as in the equivalent script of ``training/``.

    Args:
        help (`str`): One line for ``diffusers-stages --help``.
        config (`str`): The config dataclass, ``"module:Class"`` (imported only when the job is chosen).
        run (`str`): The function running a config, ``"module:function"``.
        summary (`tuple[str, ...]`): Keys (or attributes) of the result printed when the job ends.
    """

    help: str
    config: str
    run: str
    summary: tuple[str, ...] = ()

    def load(self, spec: str) -> Any:
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)


JOBS = {
    "train": Job(
        "multi-stage / FDM training (training/train_multistage.py)",
        "diffusers_stages.training.config:TrainingConfig",
        "diffusers_stages.training:train",
        ("fid", "max_train_steps", "noise_process", "model_type"),
    ),
    "train-lora": Job(
        "Decouple-then-Merge: one LoRA adapter per timestep stage (training/train_stage_lora.py)",
        "diffusers_stages.deme.config:StageLoraConfig",
        "diffusers_stages.deme:train_stage_lora",
    ),
    "merge": Job(
        "merge per-stage adapters into one stock diffusers pipeline (training/merge_stage_adapters.py)",
        "diffusers_stages.deme.config:StageMergeConfig",
        "diffusers_stages.deme:merge_stages",
        ("merge_weights", "output_dir", "hub_url"),
    ),
    "tdc": Job(
        "TDC: timestep grouping and pruned per-group experts (training/train_tdc.py)",
        "diffusers_stages.tdc.config:TDCConfig",
        "diffusers_stages.tdc:run_tdc",
        ("fid", "max_train_steps", "tdc"),
    ),
}


def _print_summary(result: Any, keys: tuple[str, ...]) -> None:
    """Print the ``keys`` of a job's result (a dict or an output dataclass)."""
    if isinstance(result, dict):
        values = {k: result[k] for k in keys if k in result}
    else:
        values = {k: getattr(result, k) for k in keys if hasattr(result, k)}
    if values:
        print(values)


def run_job(name: str, argv: list[str] | None = None, prog: str | None = None) -> Any:
    """
    Parse ``argv`` into job ``name``'s config and run it: the body of the ``training/`` scripts and of the
    subcommands, so that a script and ``diffusers-stages <name>`` are the same program.

    Args:
        name (`str`): A key of `JOBS` (``"train"``, ``"train-lora"``, ``"merge"``, ``"tdc"``).
        argv (`list[str]`, *optional*): The job's flags (defaults to ``sys.argv[1:]``).
        prog (`str`, *optional*): The program name shown in ``--help``.
    """
    from .configs import config_parser

    if name not in JOBS:
        raise ValueError(f"`name` must be one of {sorted(JOBS)}, got {name!r}.")
    cls = JOBS[name].load(JOBS[name].config)
    parser = argparse.ArgumentParser(
        prog=prog, description=JOBS[name].help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return _run_parsed(name, config_parser(cls, parser), parser.parse_args(argv))


def _run_parsed(name: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """Build the config from ``args`` (a bad value exits with the config's message) and run the job."""
    from .configs import config_from_args

    job = JOBS[name]
    try:
        config = config_from_args(job.load(job.config), args)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from .training.distributed import end_process_group

    try:
        result = job.load(job.run)(config)
    finally:
        end_process_group()  # a job may run several trainings in one process group; the script ends it
    _print_summary(result, job.summary)
    return result


def _demo(args: argparse.Namespace) -> int:
    """The main job (`diffusers_stages.demo`): the study's best configuration against the baseline."""
    from .demo import run_demo

    run_demo(args)
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits", help="'digits' (embedded), 'mnist', or a path")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 32])
    p.add_argument("--max_train_steps", type=int, default=600)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per model and seed")
    p.add_argument("--num_inference_steps", type=int, default=10, help="Heun steps of the default budget (NFE 19)")
    p.add_argument(
        "--low_nfe_steps", type=int, nargs="+", default=[4, 3], help="Heun steps of the low budgets (NFE 7 and 5)"
    )
    p.add_argument("--fid_samples", type=int, default=500)
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
    from .clustering import NoiseSchedule, cluster_timesteps, plot_clustering

    out = Path(args.output_dir)
    if args.scheduler_config:
        schedule = NoiseSchedule.from_scheduler(args.scheduler_config)
    else:
        schedule = NoiseSchedule.vp(args.num_train_timesteps, beta_min=args.beta_min, beta_max=args.beta_max)
    data, model = _cluster_inputs(args)
    result = cluster_timesteps(
        args.method,
        args.num_stages,
        data=data,
        noise_schedule=schedule,
        model=model,
        seed=args.seed,
        return_details=True,
        **_cluster_options(args),
    )
    result.stages.save_pretrained(out)
    plot_clustering(result, out / "clustering.png")
    report = _cluster_report(args, result, schedule, data)
    print(f"{args.method}: boundaries {report['boundaries']} (t = {report['boundaries_t']}) -> {out / 'stages.json'}")
    return 0


def _cluster_inputs(args: argparse.Namespace):
    """``(data, model)`` the chosen method needs: images (or their VAE latents) and / or a `UNet2DModel`."""
    from .clustering import encode_latents
    from .data import dataset_to_tensor, load_image_dataset

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
    return data, model


def _cluster_options(args: argparse.Namespace) -> dict:
    """The method's own options from the command line."""
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
    return options


def _cluster_report(args: argparse.Namespace, result, schedule, data) -> dict:
    """``clustering.json``: the boundaries in timesteps, ``t`` and sigma, and the curves they were cut from."""
    import torch

    from .utils import write_json

    stages = result.stages
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
    write_json(report, Path(args.output_dir) / "clustering.json")
    return report


def _add_cluster(p: argparse.ArgumentParser) -> None:
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


# subcommand -> (help, function adding its flags); the `JOBS` take their flags from their config
COMMANDS = {
    **{name: (job.help, None) for name, job in JOBS.items()},
    "cluster": ("divide the training timesteps into stages (stages.json and a plot)", _add_cluster),
    "demo": ("the study's best configuration (EDM-FDM) vs the EDM baseline on embedded digits, offline", _add_demo),
}


def _add_job(name: str, p: argparse.ArgumentParser) -> None:
    """The flags of `JOBS` entry ``name``: the fields of its config."""
    from .configs import config_parser

    config_parser(JOBS[name].load(JOBS[name].config), p)
    p.set_defaults(func=functools.partial(_run_subcommand, name, p))


def _run_subcommand(name: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    _run_parsed(name, parser, args)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """
    The ``diffusers-stages`` parser. Only the flags of ``command`` are added (importing its config), so that
    ``diffusers-stages --help`` imports neither torch nor diffusers.
    """
    parser = argparse.ArgumentParser(
        prog="diffusers-stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="JOB")
    for name, (help, add_flags) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if name == command:
            add_flags(p) if add_flags else _add_job(name, p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

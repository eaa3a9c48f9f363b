"""TDC: two-stage divide-and-conquer training (seed 002), the library side of ``training/train_tdc.py``.

Phase 1 trains one unified model on all timesteps for ``phase1_fraction`` of the compute budget (the trainer of
``train_multistage.py``). The unified model then groups the timesteps (gradient / task similarity plus difficulty,
:func:`~diffusers_stages.clustering.gradient_clustering`). Phase 2 gives each group a copy of the unified model,
pruned to its size budget (:func:`~diffusers_stages.tdc.pruning.flops_budgets`) by the proxy-guided search
(:func:`~diffusers_stages.tdc.pruning.proxy_prune`, proxy: :class:`DenoisingLossProxy`), and finetunes each copy on its
group's timesteps (the same trainer, ``--train_stage k``). The experts are saved as one `StageExpertsUNet` in a
pipeline folder with ``stages.json``.

Compute is counted in unified-model training steps: a step of a model with ``F_k`` MACs costs ``F_k / F``. The budget
``--max_train_steps`` covers phase 1, the proxy finetunes of the search and phase 2; phase 2 shares what is left
equally among the groups, so a cheaper expert trains for more steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch

from .proxy import DenoisingLossProxy

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (``train_multistage.py``) plus the TDC ones."""
    from ..training.trainer import build_parser as trainer_parser

    p = trainer_parser()
    p.description = "TDC: two-stage divide-and-conquer training with proxy-based pruning."
    p.set_defaults(noise_process="ddpm", output_dir="outputs/tdc", validation_steps=0)
    a = p.add_argument
    a("--phase1_fraction", type=float, default=0.5, help="share of --max_train_steps spent on the unified model")
    a("--num_groups", type=int, default=3, help="timestep groups (experts)")
    a("--prune_k", type=float, default=0.5, help="the smallest expert's MAC budget, as a fraction of the unified")
    a("--full_size_at", choices=("low_noise", "high_noise"), default="low_noise", help="which group keeps full size")
    a("--grouping_grid_size", type=int, default=25, help="timesteps measured by the gradient grouping")
    a("--grouping_images", type=int, default=128, help="images for the gradient grouping")
    a("--difficulty_weight", type=float, default=0.5, help="weight of the loss (difficulty) in the grouping")
    a("--width_ratio", type=float, default=0.25, help="fraction of a level's channels one pruning action removes")
    a("--proxy_finetune_steps", type=int, default=2, help="finetune steps before a candidate's proxy loss")
    a("--proxy_heldout_images", type=int, default=128, help="held-out images for the proxy loss")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not 0 < args.phase1_fraction < 1:
        raise ValueError(f"`--phase1_fraction` must lie in (0, 1), got {args.phase1_fraction}.")
    if args.noise_process != "ddpm":
        raise ValueError(
            f"TDC groups timesteps of an eps/VP model: `--noise_process` must be 'ddpm', got {args.noise_process!r}."
        )
    if args.num_groups < 1:
        raise ValueError(f"`--num_groups` must be >= 1, got {args.num_groups}.")
    return args


def _sub_args(args, **changes) -> argparse.Namespace:
    """A trainer run inside the TDC run: no FID, no hub push, the given changes."""
    sub = copy.copy(args)
    sub.eval_fid_samples, sub.push_to_hub = 0, False
    for k, v in changes.items():
        setattr(sub, k, v)
    return sub


def run_tdc(args: argparse.Namespace) -> dict:
    """Phase 1, grouping, pruning, phase 2 and the final expert pipeline; returns the metrics (see module doc)."""
    from diffusers import DDPMPipeline, UNet2DModel

    from ..clustering import gradient_clustering
    from ..data import dataset_to_tensor, load_image_dataset
    from ..models.profiling import count_macs
    from ..pipelines import StageAwareImagePipeline, save_pipeline
    from ..training.trainer import _finish, build_noise_process, train
    from .pruning import SearchPolicy, flops_budgets, proxy_prune

    out = Path(args.output_dir)
    budget = args.max_train_steps
    phase1_steps = max(1, round(args.phase1_fraction * budget))
    train(_sub_args(args, output_dir=str(out / "phase1"), max_train_steps=phase1_steps, train_stage=None))

    unified_pipe = StageAwareImagePipeline.from_pretrained(out / "phase1")
    unified = unified_pipe.unet
    raw_ds = load_image_dataset(
        args.train_data_dir or args.dataset_name, resolution=args.resolution, max_samples=args.max_train_samples
    )
    images = dataset_to_tensor(raw_ds, resolution=args.resolution, channels=unified.config.in_channels)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=g)
    heldout, train_images = images[order[: args.proxy_heldout_images]], images[order[args.proxy_heldout_images :]]

    grouping = gradient_clustering(
        unified,
        train_images,
        args.num_groups,
        noise_schedule=unified_pipe.scheduler,
        grid_size=args.grouping_grid_size,
        difficulty_weight=args.difficulty_weight,
        num_images=args.grouping_images,
        seed=args.seed,
    )
    stages = grouping.stages
    stages.save_pretrained(out)
    logger.info("TDC grouping: boundaries %s", stages.boundaries)

    objective, sample_scheduler, _ = build_noise_process(args, dict(unified_pipe.scheduler.config))
    example = (images[:1], torch.tensor([stages.num_train_timesteps // 2]))
    full_macs = count_macs(unified, *example)
    fractions = flops_budgets(stages.num_stages, args.prune_k, args.full_size_at)
    # what is left after phase 1 and the grouping, in unified-step equivalents, per group
    grouping_steps = args.grouping_grid_size * min(args.grouping_images, len(train_images)) / args.train_batch_size
    phase2_share = ((1 - args.phase1_fraction) * budget - grouping_steps) / stages.num_stages
    experts, groups = [], []
    for k, fraction in enumerate(fractions):
        proxy = DenoisingLossProxy(
            objective,
            stages,
            k,
            train_images,
            heldout,
            finetune_steps=args.proxy_finetune_steps,
            batch_size=min(args.train_batch_size, 32),
            learning_rate=args.learning_rate,
            seed=args.seed + k,
        )
        pruned = proxy_prune(
            unified, fraction * full_macs, proxy, example, policy=SearchPolicy(width_ratio=args.width_ratio)
        )
        search_steps = proxy.macs_spent / (3 * full_macs * args.train_batch_size)
        relative = pruned.macs / full_macs
        steps = max(1, round((phase2_share - search_steps) / relative))
        group_dir = out / "phase2" / f"group_{k}"
        # a stock DDPMPipeline: the trainer loads its start point with `DiffusionPipeline.from_pretrained`
        save_pipeline(DDPMPipeline(unet=pruned.model, scheduler=sample_scheduler), group_dir / "pruned")
        train(
            _sub_args(
                args,
                pretrained_model_name_or_path=str(group_dir / "pruned"),
                output_dir=str(group_dir),
                stages_json=str(out),
                model_type="unified",
                train_stage=k,
                max_train_steps=steps,
            )
        )
        experts.append(UNet2DModel.from_pretrained(group_dir, subfolder="unet"))
        groups.append(
            {
                "stage": k,
                "timesteps": list(stages.timestep_range(k)),
                "mac_budget_fraction": fraction,
                "macs_fraction": relative,
                "block_out_channels": list(pruned.model.config.block_out_channels),
                "down_block_types": list(pruned.model.config.down_block_types),
                "add_attention": pruned.model.config.add_attention,
                "pruning_rounds": [str(r.candidates[r.chosen][0]) for r in pruned.history],
                "search_steps_equivalent": search_steps,
                "train_steps": steps,
            }
        )

    from ..models import StageExpertsUNet

    model = StageExpertsUNet.from_experts(experts, stages)
    pipe = StageAwareImagePipeline(unet=model, scheduler=sample_scheduler)
    compute = (
        phase1_steps
        + grouping_steps
        + sum(gr["search_steps_equivalent"] + gr["train_steps"] * gr["macs_fraction"] for gr in groups)
    )
    run_info = {
        "tdc": {
            "phase1_steps": phase1_steps,
            "grouping_steps_equivalent": grouping_steps,
            "stage_boundaries": stages.boundaries,
            "groups": groups,
            "unified_macs": full_macs,
            "compute_unified_steps": compute,
        }
    }
    metrics = _finish(args, pipe, raw_ds, stages, out, run_info)
    (out / "tdc.json").write_text(json.dumps(run_info["tdc"], indent=2))
    return metrics

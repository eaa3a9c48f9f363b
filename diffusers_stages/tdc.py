"""TDC: two-stage divide-and-conquer training (seed 002), the library side of ``training/train_tdc.py``.

Phase 1 trains one unified model on all timesteps for ``phase1_fraction`` of the compute budget (the trainer of
``train_multistage.py``). The unified model then groups the timesteps (gradient / task similarity plus difficulty,
:func:`~diffusers_stages.clustering.gradient_clustering`). Phase 2 gives each group a copy of the unified model,
pruned to its size budget (:func:`~diffusers_stages.pruning.flops_budgets`) by the proxy-guided search
(:func:`~diffusers_stages.pruning.proxy_prune`, proxy: :class:`DenoisingLossProxy`), and finetunes each copy on its
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

from .stages import TimestepStages

logger = logging.getLogger(__name__)


class DenoisingLossProxy:
    r"""
    The TDC pruning proxy for one group: finetune the candidate for ``finetune_steps`` steps on the group's
    timesteps, then return its denoising loss on held-out images with fixed timesteps and noise (common random
    numbers: every candidate sees the same draws, so scores compare models, not noise).

    Args:
        objective: a trainer objective (`DiscreteObjective` / `EDMObjective`): ``sample_levels`` and ``loss``.
        stages (`TimestepStages`): the grouping.
        stage (`int`): the group ``k``.
        train_images (`torch.Tensor`): ``[N, C, H, W]`` images in ``[-1, 1]`` for the finetune.
        heldout_images (`torch.Tensor`): ``[M, C, H, W]`` images for the score.
        finetune_steps (`int`, defaults to 10): Adam steps before scoring (0: score as pruned).
        batch_size (`int`, defaults to 32): finetune batch size.
        learning_rate (`float`, defaults to 1e-3): finetune learning rate.
        seed (`int`, defaults to 0): seeds the finetune batches and the held-out draws.

    Attributes:
        macs_spent (`int`): the compute spent so far, in forward-pass MACs: a training sample counts 3 forward
            passes (forward + backward), a scored held-out sample one.
    """

    def __init__(
        self,
        objective,
        stages: TimestepStages,
        stage: int,
        train_images: torch.Tensor,
        heldout_images: torch.Tensor,
        finetune_steps: int = 10,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        seed: int = 0,
    ):
        if not 0 <= stage < stages.num_stages:
            raise ValueError(f"`stage` must lie in [0, {stages.num_stages}), got {stage}.")
        if finetune_steps < 0 or batch_size < 1:
            raise ValueError(f"need `finetune_steps` >= 0 and `batch_size` >= 1, got {finetune_steps}, {batch_size}.")
        self.objective, self.stages, self.stage = objective, stages, stage
        self.train_images, self.heldout = train_images, heldout_images
        self.finetune_steps, self.batch_size, self.learning_rate, self.seed = (
            finetune_steps,
            batch_size,
            learning_rate,
            seed,
        )
        g = torch.Generator().manual_seed(seed + 1)
        self.heldout_levels = objective.sample_levels(stages, stage, len(heldout_images), g)
        self.heldout_noise = torch.randn(heldout_images.shape, generator=g)
        self.macs_spent = 0

    def __call__(self, model) -> float:
        from .models.profiling import count_macs

        device = model.device
        macs = count_macs(
            model, self.heldout[:1].to(device), self.objective.timesteps(self.heldout_levels[:1]).to(device)
        )
        self.macs_spent += macs * (3 * self.finetune_steps * self.batch_size + len(self.heldout))
        if self.finetune_steps:
            g = torch.Generator().manual_seed(self.seed)
            optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
            model.train()
            for _ in range(self.finetune_steps):
                idx = torch.randint(len(self.train_images), (self.batch_size,), generator=g)
                x0 = self.train_images[idx].to(device)
                levels = self.objective.sample_levels(self.stages, self.stage, self.batch_size, g)
                noise = torch.randn(x0.shape, generator=g).to(device)
                loss = self.objective.loss(model, x0, noise, levels).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            losses = self.objective.loss(
                model, self.heldout.to(device), self.heldout_noise.to(device), self.heldout_levels
            )
        return float(losses.mean())


# ---------------------------------------------------------------------------------------------- the script
def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (``train_multistage.py``) plus the TDC ones."""
    from .trainer import build_parser as trainer_parser

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

    from .clustering import gradient_clustering
    from .data import dataset_to_tensor, load_image_dataset
    from .models.profiling import count_macs
    from .pipelines import StageAwareImagePipeline, save_pipeline
    from .pruning import SearchPolicy, flops_budgets, proxy_prune
    from .trainer import _finish, build_noise_process, train

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

    from .models import StageExpertsUNet

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

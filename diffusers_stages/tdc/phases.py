"""TDC: two-stage divide-and-conquer training (seed 002), the library side of ``training/train_tdc.py``.

Phase 1 trains one unified model on all timesteps for ``phase1_fraction`` of the compute budget (the trainer,
:func:`~diffusers_stages.training.train`). The unified model then groups the timesteps (gradient / task similarity
plus difficulty, :func:`~diffusers_stages.clustering.gradient_clustering`). Phase 2 gives each group a copy of the
unified model, pruned to its size budget (:func:`~diffusers_stages.tdc.pruning.flops_budgets`) by the proxy-guided
search (:func:`~diffusers_stages.tdc.pruning.proxy_prune`, proxy: :class:`DenoisingLossProxy`), and finetunes each copy
on its group's timesteps (the same trainer, ``train_stage=k``). The experts are saved as one `StageExpertsUNet` in a
pipeline folder with ``stages.json``.

Compute is counted in unified-model training steps: a step of a model with ``F_k`` MACs costs ``F_k / F``. The budget
``max_train_steps`` covers phase 1, the proxy finetunes of the search and phase 2; phase 2 shares what is left
equally among the groups, so a cheaper expert trains for more steps.

Under several processes (``accelerate launch`` / ``torchrun``) the two training phases are data-parallel (the
trainer); the grouping and the pruning search run on the main process only, which writes their results (``stages.json``,
each group's ``pruned`` pipeline and ``prune.json``) for the other processes to read, and only the main process writes
the final outputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from ..hub import start_hub_repo
from ..stages import TimestepStages
from .config import TDCConfig
from .proxy import DenoisingLossProxy

logger = logging.getLogger(__name__)


@dataclass
class _Grouping:
    """Phase 1's model, the data split and the timestep groups it gave."""

    unified_pipe: Any
    raw_dataset: Any
    train_images: torch.Tensor
    heldout: torch.Tensor
    stages: TimestepStages
    grouping_steps: float  # its cost in unified-model steps
    objective: Any  # the DDPM objective and sampler on the phase-1 scheduler config
    sample_scheduler: Any
    example: tuple  # the model inputs MACs are counted on
    full_macs: int  # the unified model's


def _sub_config(config: TDCConfig, **changes) -> TDCConfig:
    """A trainer run inside the TDC run (in a folder of its own output folder): no FID, no hub push, the given
    changes."""
    return dataclasses.replace(config, eval_fid_samples=0, push_to_hub=False, overwrite_output_dir=True, **changes)


def run_tdc(config: TDCConfig) -> dict:
    """Phase 1, grouping, pruning, phase 2 and the final expert pipeline; returns the metrics (see module doc).

    Example:

        >>> from diffusers_stages import TDCConfig, run_tdc
        >>> metrics = run_tdc(TDCConfig(max_train_steps=12, resolution=8, num_groups=2, output_dir="outputs/tdc"))
    """
    from ..training.preflight import check_data_paths, check_output_dir

    check_output_dir(config.output_dir, bool(config.resume_from_checkpoint), config.overwrite_output_dir)
    check_data_paths(config)
    config = start_hub_repo(config)  # a bad token fails before phase 1
    phase1_steps = train_phase1(config)
    grouping = group_timesteps(config)
    experts, groups = train_phase2(config, grouping)
    return save_experts(config, grouping, experts, groups, phase1_steps)


def train_phase1(config: TDCConfig) -> int:
    """Train the unified model on all timesteps into ``output_dir/phase1``; returns its steps."""
    steps = max(1, round(config.phase1_fraction * config.max_train_steps))
    phase1_dir = str(Path(config.output_dir) / "phase1")
    from ..training import train

    train(_sub_config(config, output_dir=phase1_dir, max_train_steps=steps, train_stage=None))
    return steps


def group_timesteps(config: TDCConfig) -> _Grouping:
    """Split the data (held-out images for the proxy) and group the timesteps with the phase-1 model; writes
    ``stages.json`` into ``output_dir``."""
    from ..clustering import gradient_clustering
    from ..data import dataset_to_tensor, load_image_dataset
    from ..models.profiling import count_macs
    from ..pipelines import StageAwareImagePipeline
    from ..training import build_noise_process

    out = Path(config.output_dir)
    unified_pipe = StageAwareImagePipeline.from_pretrained(out / "phase1")
    raw_ds = load_image_dataset(
        config.train_data_dir or config.dataset_name,
        resolution=config.resolution,
        max_samples=config.max_train_samples,
    )
    images = dataset_to_tensor(raw_ds, resolution=config.resolution, channels=unified_pipe.unet.config.in_channels)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    heldout, train_images = images[order[: config.proxy_heldout_images]], images[order[config.proxy_heldout_images :]]
    state = PartialState()
    if state.is_main_process:  # one grouping for all processes (GPU kernels need not agree bit for bit)
        grouping = gradient_clustering(
            unified_pipe.unet,
            train_images,
            config.num_groups,
            noise_schedule=unified_pipe.scheduler,
            grid_size=config.grouping_grid_size,
            difficulty_weight=config.difficulty_weight,
            difficulty=config.grouping_difficulty,
            num_images=config.grouping_images,
            seed=config.seed,
        )
        grouping.stages.save_pretrained(out)
    state.wait_for_everyone()
    stages = TimestepStages.from_pretrained(out)
    logger.info("TDC grouping: boundaries %s", stages.boundaries)
    grouping_steps = (
        config.grouping_grid_size * min(config.grouping_images, len(train_images)) / config.train_batch_size
    )
    objective, sample_scheduler, _ = build_noise_process(config, dict(unified_pipe.scheduler.config))
    example = (images[:1], torch.tensor([stages.num_train_timesteps // 2]))
    full_macs = count_macs(unified_pipe.unet, *example)
    return _Grouping(
        unified_pipe, raw_ds, train_images, heldout, stages, grouping_steps, objective, sample_scheduler,
        example, full_macs,
    )  # fmt: skip


def train_phase2(config: TDCConfig, grouping: _Grouping) -> tuple[list, list[dict]]:
    """Prune a copy of the unified model per group and finetune it on the group's timesteps; returns the experts
    and one report per group."""
    from .pruning import flops_budgets

    stages = grouping.stages
    fractions = flops_budgets(stages.num_stages, config.prune_k, config.full_size_at)
    # what is left after phase 1 and the grouping, in unified-step equivalents, per group
    left = (1 - config.phase1_fraction) * config.max_train_steps - grouping.grouping_steps
    share = left / stages.num_stages
    experts, groups = [], []
    for k, fraction in enumerate(fractions):
        expert, report = _prune_and_finetune(config, grouping, k, fraction, share)
        experts.append(expert)
        groups.append(report)
    return experts, groups


def _prune_and_finetune(config: TDCConfig, grouping: _Grouping, k: int, fraction: float, share: float):
    """Group ``k``: the proxy-guided pruning to ``fraction`` of the MACs (main process), then the finetune with the
    rest of its ``share`` of the budget (in unified-step equivalents) into ``output_dir/phase2/group_k``."""
    from diffusers import UNet2DModel

    from ..training import train

    group_dir = Path(config.output_dir) / "phase2" / f"group_{k}"
    state = PartialState()
    if state.is_main_process:
        report = _prune(config, grouping, k, fraction, share, group_dir)
        (group_dir / "prune.json").write_text(json.dumps(report, indent=2))
    state.wait_for_everyone()
    report = json.loads((group_dir / "prune.json").read_text())
    sub = _sub_config(
        config,
        pretrained_model_name_or_path=str(group_dir / "pruned"),
        output_dir=str(group_dir),
        stages_json=str(Path(config.output_dir)),
        model_type="unified",
        train_stage=k,
        max_train_steps=report["train_steps"],
    )
    train(sub)
    return UNet2DModel.from_pretrained(group_dir, subfolder="unet"), report


def _prune(config: TDCConfig, grouping: _Grouping, k: int, fraction: float, share: float, group_dir: Path) -> dict:
    """The proxy-guided pruning of group ``k``, saved as ``group_dir/pruned``; returns the group's report with its
    finetune steps."""
    from diffusers import DDPMPipeline

    from ..pipelines import save_pipeline
    from .pruning import SearchPolicy, proxy_prune

    full_macs = grouping.full_macs
    proxy = DenoisingLossProxy(
        grouping.objective,
        grouping.stages,
        k,
        grouping.train_images,
        grouping.heldout,
        finetune_steps=config.proxy_finetune_steps,
        batch_size=min(config.train_batch_size, 32),
        learning_rate=config.learning_rate,
        seed=config.seed + k,
    )
    policy = SearchPolicy(width_ratio=config.width_ratio)
    pruned = proxy_prune(grouping.unified_pipe.unet, fraction * full_macs, proxy, grouping.example, policy=policy)
    search_steps = proxy.macs_spent / (3 * full_macs * config.train_batch_size)
    relative = pruned.macs / full_macs
    steps = max(1, round((share - search_steps) / relative))
    # a stock DDPMPipeline: the trainer loads its start point with `DiffusionPipeline.from_pretrained`
    save_pipeline(DDPMPipeline(unet=pruned.model, scheduler=grouping.sample_scheduler), group_dir / "pruned")
    return {
        "stage": k,
        "timesteps": list(grouping.stages.timestep_range(k)),
        "mac_budget_fraction": fraction,
        "macs_fraction": relative,
        "block_out_channels": list(pruned.model.config.block_out_channels),
        "down_block_types": list(pruned.model.config.down_block_types),
        "add_attention": pruned.model.config.add_attention,
        "pruning_rounds": [str(r.candidates[r.chosen][0]) for r in pruned.history],
        "search_steps_equivalent": search_steps,
        "train_steps": steps,
    }


def save_experts(config: TDCConfig, grouping: _Grouping, experts: list, groups: list[dict], phase1_steps: int) -> dict:
    """The experts as one `StageExpertsUNet` pipeline in ``output_dir`` with samples, metrics, model card and
    ``tdc.json`` (the grouping, each group's pruning and steps, the compute spent); returns the metrics (``{}`` on
    processes other than the main one, which write nothing)."""
    if not PartialState().is_main_process:
        return {}
    from ..models import StageExpertsUNet
    from ..pipelines import StageAwareImagePipeline
    from ..training.outputs import save_run_outputs
    from ..utils import write_json

    stages = grouping.stages
    model = StageExpertsUNet.from_experts(experts, stages)
    pipe = StageAwareImagePipeline(unet=model, scheduler=grouping.sample_scheduler)
    compute = (
        phase1_steps
        + grouping.grouping_steps
        + sum(gr["search_steps_equivalent"] + gr["train_steps"] * gr["macs_fraction"] for gr in groups)
    )
    info = {
        "phase1_steps": phase1_steps,
        "grouping_steps_equivalent": grouping.grouping_steps,
        "stage_boundaries": stages.boundaries,
        "groups": groups,
        "unified_macs": grouping.full_macs,
        "compute_unified_steps": compute,
    }
    metrics = save_run_outputs(config, pipe, grouping.raw_dataset, stages, {"tdc": info})
    write_json(info, Path(config.output_dir) / "tdc.json")
    return metrics

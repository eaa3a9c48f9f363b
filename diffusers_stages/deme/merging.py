"""Exact task-arithmetic merge of per-stage LoRA adapters into one plain UNet, and the search for its weights."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ..stages import TimestepStages
from ..training.components import objective_for_scheduler
from .adapters import (
    StageAdapterFiles,
    base_state_dict,
    check_base_model,
    lora_delta,
    lora_scaling,
    read_stage_adapters,
)
from .norms_and_biases import norm_and_bias_task_vector
from .task_vectors import (
    TaskVector,
    apply_task_vector,
    is_full_finetune_dir,
    lora_task_vectors,
    read_stage_task_vectors,
    task_arithmetic,
)
from .ties import ties_merge

DEFAULT_GRID_VALUES = (0.0, 0.1, 0.2, 0.5, 1.0)  # 0 and the authors' LSUN weights (0.1, 0.1, 0.2, 0.5)


def merge_stage_adapter_files(
    unet: torch.nn.Module, files: Sequence[StageAdapterFiles], weights: Sequence[float]
) -> torch.nn.Module:
    r"""
    Fuse stage adapters into a plain UNet in place: every adapted weight becomes
    ``W + sum_k w_k (alpha / r) B_k A_k`` (computed in float64, then cast to ``W``'s dtype); per-stage norms and biases,
    if any, become ``theta + sum_k w_k tau_k`` (`norm_and_bias_task_vector`: ``tau_k = n_k - n`` for a norm
    parameter, ``(alpha / r) b_k`` for an adapted layer's bias). Channel projections, if any, are merged as
    ``P = I + sum_k w_k (P_k - I)`` and folded into their convolution (``W <- P W``, ``b <- P b``) last.

    Args:
        unet (`torch.nn.Module`): The plain base UNet (no PEFT layers).
        files (`Sequence[StageAdapterFiles]`): The adapters (see `read_stage_adapters`).
        weights (`Sequence[float]`): One merge weight ``w_k`` per adapter, in the order of ``files``.
    """
    if len(weights) != len(files):
        raise ValueError(f"`weights` must hold one weight per stage adapter ({len(files)}), got {list(weights)}.")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name in {k.split(".lora_A.")[0] for k in files[0].state_dict if ".lora_A." in k}:
            target = params.get(f"{name}.weight")
            if target is None:
                raise ValueError(f"The adapters adapt `{name}`, which this `unet` does not have.")
            update = torch.zeros(target.shape, dtype=torch.float64, device=target.device)
            for f, w in zip(files, weights):
                a, b = f.state_dict[f"{name}.lora_A.weight"], f.state_dict[f"{name}.lora_B.weight"]
                update += float(w) * lora_delta(a, b, lora_scaling(f.config), target.shape).to(target.device)
            target.copy_((target.double() + update).to(target.dtype))
        base = base_state_dict(unet)
        taus = [norm_and_bias_task_vector(f.state_dict, lora_scaling(f.config), base) for f in files]
        apply_task_vector(unet, task_arithmetic(taus, weights))
        if files[0].channel_projection is not None:
            for site in files[0].channel_projection:
                weight, bias = params[f"{site}.weight"], params.get(f"{site}.bias")
                p = torch.eye(weight.shape[0], dtype=torch.float64)
                for f, w in zip(files, weights):
                    p += float(w) * (f.channel_projection[site].double() - torch.eye(weight.shape[0]).double())
                p = p.to(weight.device)
                weight.copy_((p @ weight.double().flatten(1)).reshape(weight.shape).to(weight.dtype))
                if bias is not None:
                    bias.copy_((p @ bias.double()).to(bias.dtype))
    return unet


MergeMethod = Literal["task_arithmetic", "ties"]
MERGE_METHODS = ("task_arithmetic", "ties")


@dataclass
class StageDeltas:
    """
    The per-stage task vectors of an ``adapters_dir``, read once: LoRA adapters (``files``) or full-finetuning task
    vectors (``taus``); ``info`` is stage 0's record (base fingerprint, training settings).
    """

    stages: TimestepStages
    finetune: Literal["lora", "full"]
    info: dict
    files: list[StageAdapterFiles] | None = None
    taus: list[TaskVector] | None = None

    @classmethod
    def read(cls, adapters_dir: Union[str, os.PathLike]) -> StageDeltas:
        if is_full_finetune_dir(adapters_dir):
            stages, taus, info = read_stage_task_vectors(adapters_dir)
            return cls(stages, "full", info, taus=taus)
        stages, files = read_stage_adapters(adapters_dir)
        return cls(stages, "lora", files[0].info, files=files)

    def dense(self, unet: torch.nn.Module) -> list[TaskVector]:
        """The task vectors as dense tensors (LoRA: ``(alpha / r) B_k A_k``, computed once and kept)."""
        if self.taus is None:
            self.taus = lora_task_vectors(unet, self.files)
        return self.taus


def merge_stage_deltas(
    unet: torch.nn.Module,
    deltas: StageDeltas,
    weights: Sequence[float],
    merge_method: MergeMethod = "task_arithmetic",
    ties_density: float = 0.2,
) -> torch.nn.Module:
    r"""
    Merge per-stage task vectors into a plain UNet in place. ``"task_arithmetic"`` (DeMe's merge):
    ``theta + sum_k w_k tau_k`` (LoRA: `merge_stage_adapter_files`, channel projections included); ``"ties"``:
    ``theta + TIES(w_k tau_k)`` (`ties_merge`, trim to ``ties_density``, elect sign, disjoint mean).

    Args:
        unet (`torch.nn.Module`): The plain base UNet.
        deltas (`StageDeltas`): The stages' task vectors (`StageDeltas.read`).
        weights (`Sequence[float]`): ``w_k``, stage 0 first.
        merge_method (`str`, defaults to ``"task_arithmetic"``): ``"task_arithmetic"`` or ``"ties"``.
        ties_density (`float`, defaults to 0.2): Fraction of each task vector kept by TIES' trim.
    """
    if merge_method not in MERGE_METHODS:
        raise ValueError(f"`merge_method` must be one of {MERGE_METHODS}, got {merge_method!r}.")
    if len(weights) != deltas.stages.num_stages:
        raise ValueError(f"`weights` must hold one weight per stage ({deltas.stages.num_stages}), got {weights}.")
    if merge_method == "task_arithmetic" and deltas.finetune == "lora":
        return merge_stage_adapter_files(unet, deltas.files, weights)
    taus = deltas.dense(unet)
    merged = (
        task_arithmetic(taus, weights)
        if merge_method == "task_arithmetic"
        else ties_merge(taus, weights, ties_density)
    )
    return apply_task_vector(unet, merged)


def merge_stage_adapters(
    unet: torch.nn.Module,
    adapters_dir: Union[str, os.PathLike],
    weights: Sequence[float],
    check_base: bool = True,
    merge_method: MergeMethod = "task_arithmetic",
    ties_density: float = 0.2,
) -> torch.nn.Module:
    r"""
    Decouple-then-Merge's merge: ``theta_merged = theta + sum_k w_k (theta_k - theta)`` (or TIES, see
    `merge_stage_deltas`). The task vector of stage ``k`` is its LoRA update ``(alpha / r) B_k A_k`` on every adapted
    weight, or, for full finetuning, its stored ``tau_k`` of every tensor. The result is an ordinary UNet (no PEFT
    layers) that stock diffusers loads.

    Args:
        unet (`UNet2DConditionModel` or `UNet2DModel`): The plain base model the stages were trained on (modified
            in place and returned).
        adapters_dir (`str` or `os.PathLike`): Folder written by `train_stage_lora` (LoRA or full).
        weights (`Sequence[float]`): ``w_k``, one per stage, stage 0 (least noisy) first.
        check_base (`bool`, defaults to `True`): Verify the base-weights fingerprint.
        merge_method (`str`, defaults to ``"task_arithmetic"``): ``"task_arithmetic"`` or ``"ties"``.
        ties_density (`float`, defaults to 0.2): Fraction kept by TIES' trim.
    """
    deltas = StageDeltas.read(adapters_dir)
    if check_base:
        check_base_model(unet, deltas.info)
    return merge_stage_deltas(unet, deltas, weights, merge_method, ties_density)


@torch.no_grad()
def heldout_denoising_loss(
    model: Callable,
    scheduler,
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    r"""
    The mean denoising loss of the base's objective on held-out data at stratified noise levels (the quantiles
    ``u_i = (i + U_i) / n`` of the training distribution: ``t_i = floor(u_i T)`` for DDPM, ``sigma_i = icdf(u_i)``
    in sigma space) with noise drawn from ``seed``: ``E |target - F(x_t, t)|^2`` (DDPM family) or
    ``E lambda(sigma) |D(x; sigma) - x0|^2`` (``FDMEDMScheduler``). The same draws for every call, so candidate merges
    are compared on equal terms.

    Args:
        model (`Callable`): The UNet.
        scheduler (`SchedulerMixin` or objective): The training noise scheduler or its objective
            (`objective_for_scheduler`).
        x0 (`torch.Tensor`): Held-out clean samples (latents for Stable Diffusion).
        encoder_hidden_states (`torch.Tensor`, *optional*): Their text embeddings.
        seed (`int`, defaults to 0): Seed of the levels and noise.
        batch_size (`int`, defaults to 64): Forward batch size.
    """
    objective = objective_for_scheduler(scheduler)
    g = torch.Generator().manual_seed(seed)
    n = x0.shape[0]
    levels = objective.levels_at((torch.arange(n) + torch.rand(n, generator=g)) / n)
    levels = levels[torch.randperm(n, generator=g)]
    noise = torch.randn(x0.shape, generator=g)
    total = 0.0
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        kwargs = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states[sl]}
        x, eps = x0[sl], noise[sl].to(x0.device, x0.dtype)
        total += float(objective.loss(model, x, eps, levels[sl], **kwargs).sum())
    return total / n


@dataclass
class MergeSearchOutput(BaseOutput):
    """
    Args:
        weights (`list[float]`): The best merge weights, stage 0 first.
        score (`float`): Their score (lower is better).
        results (`list[dict]`): Every candidate with its score, in the order tried.
    """

    weights: list[float]
    score: float
    results: list[dict]


def grid_search_merge_weights(
    unet: torch.nn.Module,
    adapters_dir: Union[str, os.PathLike, StageDeltas],
    score_fn: Callable[[torch.nn.Module], float],
    values: Sequence[float] = DEFAULT_GRID_VALUES,
    candidates: Sequence[Sequence[float]] | None = None,
    merge_method: MergeMethod = "task_arithmetic",
    ties_density: float = 0.2,
) -> MergeSearchOutput:
    r"""
    Grid search of the merge weights: for every ``w in values^K`` (or each of the given ``candidates``) the stages
    are merged into ``unet`` (`merge_stage_deltas`) and the merged model is scored with ``score_fn(unet)``
    (`heldout_denoising_loss`, or an FID); the lowest score wins. ``unet`` stays on its device (move it to the GPU
    first), is loaded once, and gets its base weights back on exit; each candidate runs at the plain model's speed.

    Args:
        unet (`torch.nn.Module`): The plain base UNet the stages were trained on.
        adapters_dir (`str`, `os.PathLike` or `StageDeltas`): Folder written by `train_stage_lora`, or its contents.
        score_fn (`Callable`): Maps the merged UNet to a float, lower is better.
        values (`Sequence[float]`, defaults to (0.0, 0.1, 0.2, 0.5, 1.0)): Per-stage grid values; 0 (the stage left
            out) and the authors' LSUN weights (0.1, 0.1, 0.2, 0.5) are on the default grid.
        candidates (`Sequence[Sequence[float]]`, *optional*): Explicit weight vectors instead of the full grid.
        merge_method (`str`, defaults to ``"task_arithmetic"``): ``"task_arithmetic"`` or ``"ties"``.
        ties_density (`float`, defaults to 0.2): Fraction kept by TIES' trim.
    """
    deltas = adapters_dir if isinstance(adapters_dir, StageDeltas) else StageDeltas.read(adapters_dir)
    check_base_model(unet, deltas.info)
    K = deltas.stages.num_stages
    if candidates is not None:
        grid = [[float(w) for w in c] for c in candidates]
    else:
        grid = [list(c) for c in itertools.product([float(v) for v in values], repeat=K)]
    if not grid or any(len(c) != K for c in grid):
        raise ValueError(f"Every candidate in `candidates` must hold {K} weights (one per stage), got {grid[:3]}.")
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    results = []
    try:
        for w in tqdm(grid, desc="merge weights"):
            unet.load_state_dict(base)
            merge_stage_deltas(unet, deltas, w, merge_method, ties_density)
            results.append({"weights": w, "score": float(score_fn(unet))})
    finally:
        unet.load_state_dict(base)
    best = min(results, key=lambda r: r["score"])
    return MergeSearchOutput(weights=best["weights"], score=best["score"], results=results)

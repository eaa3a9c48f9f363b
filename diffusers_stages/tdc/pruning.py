"""Proxy-based structured pruning of diffusers `UNet2DModel`s (TDC, seed 002).

Pruning here changes the ARCHITECTURE, never masks: a pruned model is an ordinary `UNet2DModel` built from a smaller
config (narrower levels, attention blocks removed) whose weights are sliced from the original, so it saves, loads and
runs in stock pipelines and its parameters and MACs really shrink.

What a stock `UNet2DModel` config can express, and therefore what can be pruned:

- the width of a level (``block_out_channels[i]``): every channel space of that level shrinks together. Residual
  streams keep the first channels of every GroupNorm group (the groups stay aligned: new group ``g`` is a subset of
  old group ``g``); the inner channels of each ResNet block (conv1 out / norm2 / conv2 in / time projection) keep
  the channels with the largest conv1 filter L1 norm, per GroupNorm group; attention heads go with the width (the
  head dimension is fixed, the first heads are kept); with ``resnet_time_scale_shift="scale_shift"`` (IDDPM) the
  time projection's scale and shift halves keep the same channels as the block; the time features of a narrower
  level 0 shrink with it: sinusoidal (``"positional"``) features are mapped to the old features of nearest
  frequency (exact for freq_shift 0 and an integer ratio), Fourier and learned features keep the features whose
  ``time_embedding.linear_1`` columns have the largest L1 norm (exact when the removed columns are zero); the time
  embedding keeps its width;
- whole attention blocks: an ``AttnDownBlock2D`` / ``AttnUpBlock2D`` pair becomes ``DownBlock2D`` / ``UpBlock2D``,
  the mid block's attention is dropped with ``add_attention=False``.

The decision loop (:func:`proxy_prune`) is a multi-round search: each round a policy proposes actions, every
candidate is built and scored by a proxy (lower is better, e.g. the group's denoising loss after a short finetune),
and the best one is kept, until the model's MACs are within budget.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from diffusers import UNet2DModel
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ..models.profiling import count_macs

_ATTN_DOWN, _ATTN_UP = "AttnDownBlock2D", "AttnUpBlock2D"
_PLAIN_DOWN, _PLAIN_UP = "DownBlock2D", "UpBlock2D"


# ---------------------------------------------------------------------------------------------- budgets
def flops_budgets(
    num_groups: int, k: float, full_size_at: Literal["low_noise", "high_noise"] = "low_noise"
) -> list[float]:
    r"""
    The TDC size budget of each group as a fraction of the full model's FLOPs ``F``:

        FLOPs_i / F = i / N + (N - i) / N * k,   i = 0 .. N,   N = num_groups - 1

    a linear ramp from ``k`` to ``1`` over the groups (one group: ``1``).

    Args:
        num_groups (`int`): the number of groups (stages), ``>= 1``.
        k (`float`): the smallest budget, in ``(0, 1]``.
        full_size_at (`str`, defaults to `"low_noise"`): which end gets the full size: ``"low_noise"`` (stage 0, as
            the multi-stage paper gives most capacity to low noise) or ``"high_noise"``.

    Returns:
        `list[float]`: one fraction per group, stage 0 first.
    """
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"`num_groups` must be a positive int, got {num_groups!r}.")
    if not 0 < k <= 1:
        raise ValueError(f"`k` must lie in (0, 1], got {k}.")
    if full_size_at not in ("low_noise", "high_noise"):
        raise ValueError(f"`full_size_at` must be 'low_noise' or 'high_noise', got {full_size_at!r}.")
    n = num_groups - 1
    ramp = [1.0] if n == 0 else [i / n + (n - i) / n * k for i in range(num_groups)]
    return ramp[::-1] if full_size_at == "low_noise" else ramp


# ---------------------------------------------------------------------------------------------- weight slicing
def _group_prefix(n: int, n_new: int, groups: int) -> torch.Tensor:
    """The first ``n_new / G`` channels of each of the ``G`` groups (plain prefix when the sizes do not divide)."""
    if n % groups or n_new % groups:
        return torch.arange(n_new)
    per, per_new = n // groups, n_new // groups
    return (torch.arange(groups)[:, None] * per + torch.arange(per_new)[None, :]).flatten()


def _group_topk(scores: torch.Tensor, n_new: int, groups: int) -> torch.Tensor:
    """Per group, the ``n_new / G`` highest-scoring channels (in their original order)."""
    n = scores.numel()
    if n % groups or n_new % groups:
        return scores.topk(n_new).indices.sort().values
    per, per_new = n // groups, n_new // groups
    top = scores.view(groups, per).topk(per_new, dim=1).indices.sort(dim=1).values
    return (top + torch.arange(groups)[:, None] * per).flatten()


def _frequency_map(half: int, half_new: int, shift: float) -> torch.Tensor:
    """For each new sinusoid frequency index, the old index of nearest frequency (``exp(-ln(1e4) i / (h - s))``)."""
    j = torch.arange(half_new, dtype=torch.float64)
    return (j * (half - shift) / max(half_new - shift, 1e-9)).round().long().clamp(max=half - 1)


def _up_resnet_segments(config) -> dict[str, list[int]]:
    """``up_blocks.i.resnets.j`` -> the sizes of the concatenated ``[hidden, skip]`` input of that ResNet."""
    widths = list(reversed(config["block_out_channels"]))
    n, layers = len(widths), config["layers_per_block"] + 1
    segments, out = {}, widths[0]
    for i in range(n):
        prev, out, skip_in = out, widths[i], widths[min(i + 1, n - 1)]
        for j in range(layers):
            segments[f"up_blocks.{i}.resnets.{j}"] = [prev if j == 0 else out, skip_in if j == layers - 1 else out]
    return segments


class _Slicer:
    """Index selection for every (parameter, dim) whose size changes between the old and the new config."""

    def __init__(self, old: UNet2DModel, new_config):
        self.state = old.state_dict()
        self.old_config, self.new_config = old.config, new_config
        self.groups = old.config.norm_num_groups
        self.old_segments = _up_resnet_segments(old.config)
        self.new_segments = _up_resnet_segments(new_config)

    def time_features(self, n_new: int) -> torch.Tensor:
        """The kept Fourier / learned time features: the ``n_new`` of largest ``linear_1`` column L1 norm."""
        columns = self.state["time_embedding.linear_1.weight"].abs().sum(0)
        if self.old_config.time_embedding_type == "fourier":  # [sin(2 pi w_i t), cos(2 pi w_i t)]: two columns each
            columns = columns.view(2, -1).sum(0)
        return columns.topk(n_new).indices.sort().values

    def index(self, name: str, dim: int, n: int, n_new: int) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        owner, _, sub = module.rpartition(".")
        kind = self.old_config.time_embedding_type
        if name in ("time_embedding.linear_1.weight", "class_embedding.linear_1.weight") and dim == 1:
            if kind == "learned":
                return self.time_features(n_new)
            half, half_new = n // 2, n_new // 2
            freq = (
                self.time_features(half_new)
                if kind == "fourier"
                else _frequency_map(half, half_new, self.old_config.freq_shift)
            )
            return torch.cat([freq, freq + half])
        if name == "time_proj.weight":  # Fourier frequencies [C0] or the learned embedding table [T, C0]
            return self.time_features(n_new)
        if (sub in ("to_q", "to_k", "to_v") and dim == 0) or (module.endswith("to_out.0") and dim == 1):
            return torch.arange(n_new)  # whole heads, the first ones (the head dimension is fixed)
        if ".resnets." in module:
            if (sub, dim) in (("conv1", 0), ("time_emb_proj", 0), ("norm2", 0), ("conv2", 1)):
                conv1 = self.state[f"{owner}.conv1.weight"]
                scores = conv1.abs().flatten(1).sum(1)
                if sub == "time_emb_proj" and n == 2 * len(scores):  # scale_shift: [scale, shift], one per channel
                    kept = _group_topk(scores, n_new // 2, self.groups)
                    return torch.cat([kept, kept + len(scores)])
                return _group_topk(scores, n_new, self.groups)
            if owner in self.old_segments and ((sub, dim) in (("norm1", 0), ("conv1", 1), ("conv_shortcut", 1))):
                old_seg, new_seg = self.old_segments[owner], self.new_segments[owner]
                return torch.cat(
                    [
                        offset + _group_prefix(a, b, self.groups)
                        for offset, a, b in zip([0, old_seg[0]], old_seg, new_seg)
                    ]
                )
        return _group_prefix(n, n_new, self.groups)

    def slice(self, name: str, target: torch.Tensor) -> torch.Tensor:
        source = self.state[name]
        for dim, (n, n_new) in enumerate(zip(source.shape, target.shape)):
            if n != n_new:
                source = source.index_select(dim, self.index(name, dim, n, n_new))
        return source

    def shortcut_identity(self, name: str, target: torch.Tensor) -> torch.Tensor:
        """A 1x1 shortcut the old block did not need (``in == out`` there): the old identity, re-indexed."""
        if name.endswith("bias"):
            return torch.zeros_like(target)
        owner = name.rsplit(".", 2)[0]
        w1, w2 = self.state[f"{owner}.conv1.weight"], self.state[f"{owner}.conv2.weight"]
        idx_in = self.index(f"{owner}.conv1.weight", 1, w1.shape[1], target.shape[1])
        idx_out = self.index(f"{owner}.conv2.weight", 0, w2.shape[0], target.shape[0])
        eye = (idx_out[:, None] == idx_in[None, :]).to(target.dtype)
        return eye[:, :, None, None]


def _check_config(unet: UNet2DModel, config: dict) -> None:
    old = unet.config
    widths, old_widths = list(config["block_out_channels"]), list(old.block_out_channels)
    if len(widths) != len(old_widths) or any(w < 1 or w > o for w, o in zip(widths, old_widths)):
        raise ValueError(f"`block_out_channels` must be {len(old_widths)} widths <= {old_widths}, got {widths}.")
    unit = math.lcm(old.norm_num_groups, old.attention_head_dim or 1)
    if any(w % unit for w in widths):
        raise ValueError(
            f"`block_out_channels` must be multiples of {unit} (norm_num_groups and attention_head_dim), got {widths}."
        )
    for key, attn, plain in (("down_block_types", _ATTN_DOWN, _PLAIN_DOWN), ("up_block_types", _ATTN_UP, _PLAIN_UP)):
        for i, (new, prev) in enumerate(zip(config[key], old[key])):
            if new != prev and not (prev == attn and new == plain):
                raise ValueError(f"`{key}[{i}]` can only go from {attn!r} to {plain!r}, got {prev!r} -> {new!r}.")
    if config["add_attention"] and not old.add_attention:
        raise ValueError("`add_attention` cannot be switched on by pruning.")


def prune_unet(
    unet: UNet2DModel,
    block_out_channels: Sequence[int] | None = None,
    remove_attention: Sequence[int | Literal["mid"]] = (),
) -> UNet2DModel:
    r"""
    A smaller, ordinary `UNet2DModel` whose weights are sliced from ``unet`` (see the module docstring for the
    channel selection). With no change requested it reproduces ``unet`` exactly.

    Args:
        unet (`UNet2DModel`): the model to prune (left untouched).
        block_out_channels (`list[int]`, *optional*): the new width of each level, each ``<=`` the old one and a
            multiple of ``norm_num_groups`` and ``attention_head_dim``.
        remove_attention (`list`): levels (down-block indices; the mirrored up block goes too) whose attention
            blocks are removed, and/or ``"mid"`` for the mid block's attention.

    Returns:
        `UNet2DModel` on ``unet``'s device and dtype.
    """
    if type(unet) is not UNet2DModel:
        raise ValueError(f"`unet` must be a diffusers `UNet2DModel`, got {type(unet).__name__}.")
    config = dict(unet.config)
    n = len(config["block_out_channels"])
    if block_out_channels is not None:
        config["block_out_channels"] = tuple(int(w) for w in block_out_channels)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for level in remove_attention:
        if level == "mid":
            config["add_attention"] = False
        elif isinstance(level, int) and 0 <= level < n and down[level] == _ATTN_DOWN and up[n - 1 - level] == _ATTN_UP:
            down[level], up[n - 1 - level] = _PLAIN_DOWN, _PLAIN_UP
        else:
            raise ValueError(
                f"`remove_attention` entries must be 'mid' or a level in [0, {n}) with attention blocks, got {level!r}."
            )
    config["down_block_types"], config["up_block_types"] = tuple(down), tuple(up)
    _check_config(unet, config)
    # the time embedding keeps its width when level 0 narrows (only its sinusoid input changes)
    config["time_embedding_dim"] = unet.time_embedding.linear_2.out_features
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    pruned = UNet2DModel.from_config(config)
    slicer = _Slicer(unet, config)
    new_state = {}
    for name, target in pruned.state_dict().items():
        if name in slicer.state:
            new_state[name] = slicer.slice(name, target)
        else:  # only a conv_shortcut that the narrower block now needs
            new_state[name] = slicer.shortcut_identity(name, target)
    pruned.load_state_dict(new_state)
    if (pruned.device, pruned.dtype) != (unet.device, unet.dtype):
        pruned = pruned.to(device=unet.device, dtype=unet.dtype)
    return pruned.train(unet.training)


# ---------------------------------------------------------------------------------------------- actions and policies
@dataclass(frozen=True)
class PruningAction:
    r"""
    One structured pruning step.

    Args:
        kind (`str`): ``"width"`` (narrow one level by ``ratio``, rounded down to the width unit) or ``"attention"``
            (remove the attention blocks of one level, or of the mid block).
        level (`int` or `"mid"`): the level (down-block index), or ``"mid"`` for ``kind="attention"``.
        ratio (`float`, defaults to 0.25): the fraction of the level's channels removed by a ``"width"`` action.
    """

    kind: Literal["width", "attention"]
    level: int | Literal["mid"]
    ratio: float = 0.25

    def apply(self, unet: UNet2DModel) -> UNet2DModel | None:
        """The pruned model, or `None` when the action does not apply (nothing left to remove)."""
        config = unet.config
        if self.kind == "attention":
            if self.level == "mid":
                return prune_unet(unet, remove_attention=["mid"]) if config.add_attention else None
            if config.down_block_types[self.level] != _ATTN_DOWN:
                return None
            return prune_unet(unet, remove_attention=[self.level])
        if self.kind != "width":
            raise ValueError(f"`kind` must be 'width' or 'attention', got {self.kind!r}.")
        unit = math.lcm(config.norm_num_groups, config.attention_head_dim or 1)
        widths = list(config.block_out_channels)
        target = (int(widths[self.level] * (1 - self.ratio)) // unit) * unit
        if target < unit or target >= widths[self.level]:
            target = widths[self.level] - unit
        if target < unit:
            return None
        widths[self.level] = target
        return prune_unet(unet, block_out_channels=widths)

    def __str__(self) -> str:
        return f"{self.kind}[{self.level}]" + (f"-{self.ratio:g}" if self.kind == "width" else "")


@dataclass
class PruningCandidate:
    """A scored candidate of one round: the action, its model, its MACs and its proxy score (lower is better)."""

    action: PruningAction
    model: UNet2DModel
    macs: int
    score: float


@dataclass
class PruningRound:
    """One round of the loop: every candidate's ``(action, macs, score)`` and the index of the kept one."""

    candidates: list[tuple[str, int, float]]
    chosen: int


class PruningPolicy(Protocol):
    r"""
    The decision-maker of :func:`proxy_prune` (the TDC authors used a language model). Each round the loop asks
    ``propose`` for actions, builds every applicable one that lowers the MACs, scores it with the proxy, and asks
    ``choose`` which candidate to keep.

    Attributes:
        needs_reference_score (`bool`): score (a deep copy of) the starting model before the first round, so that
            ``choose`` sees the current model's score from the first round on (else ``nan`` in the first round;
            later rounds always get the kept candidate's score). Costs one proxy call.

    Methods:
        propose(unet, history) -> list of `PruningAction`: the actions to try on the current model, given the
            rounds so far (`PruningRound`: every candidate's ``(action, macs, score)`` and the kept index).
        choose(candidates, macs, score) -> int: the index of the candidate to keep; ``candidates`` are
            `PruningCandidate` (``action``, ``model``, ``macs``, ``score``; lower scores are better), ``macs`` and
            ``score`` those of the current model.

    Example, a language-model-driven policy (``ask`` is any ``prompt -> answer`` function, e.g. a chat model):

    ```py
    from diffusers_stages.tdc import SearchPolicy


    class LanguageModelPolicy:
        needs_reference_score = True

        def __init__(self, ask):
            self.ask, self.search = ask, SearchPolicy()

        def propose(self, unet, history):
            return self.search.propose(unet, history)  # every applicable action; an LM could pick a subset

        def choose(self, candidates, macs, score):
            lines = [f"{i}: {c.action}, {c.macs} MACs, loss {c.score:.4f}" for i, c in enumerate(candidates)]
            prompt = (
                f"A diffusion UNet has {macs} MACs and denoising loss {score:.4f}. Which pruned candidate should "
                "be kept? Answer with its number only.\n" + "\n".join(lines)
            )
            return int(self.ask(prompt).strip())
    ```
    """

    needs_reference_score: bool

    def propose(self, unet: UNet2DModel, history: Sequence[PruningRound]) -> Sequence[PruningAction]: ...

    def choose(self, candidates: Sequence[PruningCandidate], macs: int, score: float) -> int: ...


@dataclass
class SearchPolicy:
    r"""
    The built-in policy, needs nothing external: propose every applicable action (narrow each level by
    ``width_ratio``, remove each remaining attention block); keep

    - ``selection="greedy"``: the candidate with the lowest proxy score (ties: fewer MACs);
    - ``selection="cost_aware"``: the lowest proxy increase per MAC saved over the current model (score ``s``,
      ``m`` MACs): ``max(s_c - s, 0) / (m - m_c)`` (ties: fewer MACs), so a large saving may cost a little more
      loss. Scores the starting model once (``needs_reference_score``).

    Args:
        width_ratio (`float`, defaults to 0.25): the fraction of a level's channels one width action removes.
        attention (`bool`, defaults to `True`): also propose removing attention blocks.
        selection (`str`, defaults to `"greedy"`): ``"greedy"`` or ``"cost_aware"``.
    """

    width_ratio: float = 0.25
    attention: bool = True
    selection: Literal["greedy", "cost_aware"] = "greedy"

    def __post_init__(self):
        if self.selection not in ("greedy", "cost_aware"):
            raise ValueError(f"`selection` must be 'greedy' or 'cost_aware', got {self.selection!r}.")

    @property
    def needs_reference_score(self) -> bool:
        return self.selection == "cost_aware"

    def propose(self, unet: UNet2DModel, history: Sequence[PruningRound]) -> list[PruningAction]:
        n = len(unet.config.block_out_channels)
        actions = [PruningAction("width", i, self.width_ratio) for i in range(n)]
        if self.attention:
            actions += [PruningAction("attention", i) for i in range(n)] + [PruningAction("attention", "mid")]
        return actions

    def choose(self, candidates: Sequence[PruningCandidate], macs: int, score: float) -> int:
        if self.selection == "greedy":
            return min(range(len(candidates)), key=lambda i: (candidates[i].score, candidates[i].macs))
        return min(
            range(len(candidates)),
            key=lambda i: (max(candidates[i].score - score, 0.0) / (macs - candidates[i].macs), candidates[i].macs),
        )


@dataclass
class ProxyPruningOutput(BaseOutput):
    """
    Args:
        model (`UNet2DModel`): the pruned model (the kept candidate of the last round, as its proxy left it).
        macs (`int`): its MACs for the example input.
        score (`float`): its proxy score (``nan`` when no round was needed).
        history (`list[PruningRound]`): every round's candidates and choice.
    """

    model: UNet2DModel
    macs: int
    score: float
    history: list[PruningRound] = field(default_factory=list)


def proxy_prune(
    unet: UNet2DModel,
    mac_budget: float,
    proxy: Callable[[UNet2DModel], float],
    example_inputs: tuple,
    policy: PruningPolicy | None = None,
    max_rounds: int = 32,
    progress: bool = True,
    return_dict: bool = True,
):
    r"""
    Multi-round proxy-guided pruning. Each round: ``policy.propose(model, history)`` proposes actions; each
    applicable action that lowers the MACs is built and scored with ``proxy(candidate)`` (lower is better);
    ``policy.choose`` picks the candidate to keep (`SearchPolicy`: the lowest score, or the lowest score increase
    per MAC saved). Stops when ``count_macs(model, *example_inputs) <= mac_budget``.

    The proxy may train the candidate in place (e.g. a short finetune before measuring the loss): the kept model is
    the object the proxy scored, so its finetuning carries into the next round.

    Args:
        unet (`UNet2DModel`): the model to prune (left untouched).
        mac_budget (`float`): the MAC budget for one forward pass on ``example_inputs``.
        proxy (`Callable`): ``proxy(model) -> float``, lower is better.
        example_inputs (`tuple`): ``(sample, timestep)`` for `count_macs`.
        policy (`PruningPolicy`, *optional*): proposes actions and chooses among the scored candidates; default
            `SearchPolicy()` (greedy).
        max_rounds (`int`, defaults to 32): give up (``ValueError``) after this many rounds.
        progress (`bool`, defaults to `True`): show a progress bar over the rounds.
        return_dict (`bool`, defaults to `True`): return a `ProxyPruningOutput` instead of ``(model, macs, score,
            history)``.
    """
    if mac_budget <= 0:
        raise ValueError(f"`mac_budget` must be positive, got {mac_budget}.")
    policy = policy if policy is not None else SearchPolicy()
    model, macs, score = unet, count_macs(unet, *example_inputs), float("nan")
    if policy.needs_reference_score and macs > mac_budget:
        score = float(proxy(copy.deepcopy(unet)))  # a copy: the proxy may train what it scores
    history: list[PruningRound] = []
    bar = tqdm(total=max_rounds, desc="pruning rounds", disable=not progress)
    while macs > mac_budget:
        if len(history) >= max_rounds:
            raise ValueError(f"`mac_budget` {mac_budget:.3g} not reached in `max_rounds` {max_rounds} (at {macs}).")
        candidates = []
        for action in policy.propose(model, history):
            pruned = action.apply(model)
            if pruned is None:
                continue
            pruned_macs = count_macs(pruned, *example_inputs)
            if pruned_macs < macs:
                candidates.append(PruningCandidate(action, pruned, pruned_macs, float(proxy(pruned))))
        if not candidates:
            raise ValueError(f"`mac_budget` {mac_budget:.3g} is unreachable: no action lowers the MACs below {macs}.")
        best = policy.choose(candidates, macs, score)
        if isinstance(best, bool) or not isinstance(best, int) or not 0 <= best < len(candidates):
            raise ValueError(f"`policy.choose` must return a candidate index in [0, {len(candidates)}), got {best!r}.")
        history.append(PruningRound([(str(c.action), c.macs, c.score) for c in candidates], best))
        model, macs, score = candidates[best].model, candidates[best].macs, candidates[best].score
        bar.update(1)
        bar.set_postfix(macs=f"{macs:.3g}", score=f"{score:.4g}")
    bar.close()
    if not return_dict:
        return model, macs, score, history
    return ProxyPruningOutput(model=model, macs=macs, score=score, history=history)

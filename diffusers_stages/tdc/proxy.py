"""The TDC pruning proxy: a candidate's held-out denoising loss after a short finetune on its group's timesteps."""

from __future__ import annotations

import torch

from ..stages import TimestepStages


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
        from ..models.profiling import count_macs

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

"""EMA of each stage's finetuned weights (adapters or the full UNet), the weights DeMe's authors merge."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class StageEMA:
    r"""
    One exponential moving average per stage, with the DeMe authors' settings (diffusers' `EMAModel` with warm-up):
    after optimizer step ``n`` of stage ``k``, ``ema_k <- d_n ema_k + (1 - d_n) theta_k`` with
    ``d_n = min(max_decay, 1 - (1 + (n - 1) / inv_gamma)^(-power))`` (``d_1 = 0``: the EMA starts at the weights).
    The EMA weights are what gets saved (and so merged).

    Args:
        parameters (`Callable[[int], Sequence[torch.nn.Parameter]]`): The trainable parameters of a stage.
        stages (`Sequence[int]`): The stages with an EMA.
        max_decay (`float`, defaults to 0.9999): The authors' ``ema_max_decay``.
        inv_gamma (`float`, defaults to 1.0): The authors' ``ema_inv_gamma``.
        power (`float`, defaults to 0.75): The authors' ``ema_power``.
    """

    def __init__(
        self,
        parameters: Callable[[int], Sequence[torch.nn.Parameter]],
        stages: Sequence[int],
        max_decay: float = 0.9999,
        inv_gamma: float = 1.0,
        power: float = 0.75,
    ):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"`ema_max_decay` must be in [0, 1), got {max_decay!r}.")
        self.parameters = parameters
        self.emas = {
            k: EMAModel(parameters(k), decay=max_decay, use_ema_warmup=True, inv_gamma=inv_gamma, power=power)
            for k in stages
        }

    def step(self, stage: int) -> None:
        """Update stage ``stage``'s EMA after its optimizer step."""
        self.emas[stage].step(self.parameters(stage))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap every stage's EMA weights into its parameters (e.g. to save them); the trained ones come back on exit."""
        for k, ema in self.emas.items():
            ema.store(self.parameters(k))
            ema.copy_to(self.parameters(k))
        try:
            yield
        finally:
            for k, ema in self.emas.items():
                ema.restore(self.parameters(k))

    def state_dict(self) -> dict:
        """All stages' EMA states (for ``accelerator.register_for_checkpointing``)."""
        return {str(k): ema.state_dict() for k, ema in self.emas.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, ema in self.emas.items():
            ema.load_state_dict(state[str(k)])

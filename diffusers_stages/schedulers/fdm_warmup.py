"""FDM's loss-weight warm-up: clamp the per-sample loss weight, raising the clamp geometrically until it is removed."""

from __future__ import annotations

import torch


class FDMLossWarmup:
    r"""
    Clamp ``lambda(sigma) <= c`` with ``c = start * (end / start) ** (n / warmup_steps)`` after ``n`` calls of
    `step`; once ``n >= warmup_steps`` (``c`` has reached ``end``) the clamp is removed. FDM uses 5 -> 500 over
    200 .. 800 steps.

    The state (``n``) is saved with `state_dict` / restored with `load_state_dict` (e.g. via accelerate's
    ``register_for_checkpointing``), so a resumed run continues the warm-up where it was (the authors' code restarts
    it). ``c`` is computed from ``n`` rather than multiplied up, so it reaches ``end`` exactly.

    Args:
        start (`float`, defaults to 5.0): The first clamp value, > 0.
        end (`float`, defaults to 500.0): The last clamp value, > ``start``.
        warmup_steps (`int`, defaults to 200): Number of `step` calls from ``start`` to ``end``, >= 1.
    """

    def __init__(self, start: float = 5.0, end: float = 500.0, warmup_steps: int = 200):
        if not start > 0:
            raise ValueError(f"`start` must be > 0, got {start!r}.")
        if not end > start:
            raise ValueError(f"`end` must be > `start`, got start={start!r}, end={end!r}.")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"`warmup_steps` must be a positive int, got {warmup_steps!r}.")
        self.start, self.end, self.warmup_steps = float(start), float(end), warmup_steps
        self.num_steps = 0

    @property
    def finished(self) -> bool:
        return self.num_steps >= self.warmup_steps

    @property
    def clamp_value(self) -> float | None:
        """The current ``c``, or `None` once the warm-up has finished (no clamp)."""
        if self.finished:
            return None
        return self.start * (self.end / self.start) ** (self.num_steps / self.warmup_steps)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """``min(weight, c)`` elementwise; ``weight`` unchanged once finished."""
        c = self.clamp_value
        return weight if c is None else weight.clamp(max=c)

    def step(self) -> None:
        """Advance one training step: ``c <- c * (end / start) ** (1 / warmup_steps)``."""
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "start": self.start, "end": self.end, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``num_steps``; the hyper-parameters in ``state_dict`` must match this object's."""
        for key in ("start", "end", "warmup_steps"):
            if key in state_dict and float(state_dict[key]) != float(getattr(self, key)):
                raise ValueError(
                    f"`state_dict` was saved with {key}={state_dict[key]!r}, but this warm-up has {getattr(self, key)!r}."
                )
        num_steps = state_dict["num_steps"]
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"`num_steps` in `state_dict` must be a non-negative int, got {num_steps!r}.")
        self.num_steps = num_steps

    def __repr__(self) -> str:
        return f"FDMLossWarmup(start={self.start}, end={self.end}, warmup_steps={self.warmup_steps}, num_steps={self.num_steps})"

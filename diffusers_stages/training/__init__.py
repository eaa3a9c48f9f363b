"""Training: objectives (DDPM / FDM / EDM / EDM-FDM), the accelerate loop, checkpointing and run outputs."""

from .objectives import DiscreteObjective, EDMObjective
from .trainer import train

__all__ = ["DiscreteObjective", "EDMObjective", "train"]

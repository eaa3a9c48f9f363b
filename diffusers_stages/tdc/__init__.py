"""TDC: two-phase divide-and-conquer training by timestep groups, and proxy-based structured pruning."""

from .config import TDCConfig
from .phases import run_tdc
from .proxy import DenoisingLossProxy
from .pruning import (
    ProxyPruningOutput,
    PruningAction,
    PruningCandidate,
    PruningPolicy,
    PruningRound,
    SearchPolicy,
    flops_budgets,
    proxy_prune,
    prune_unet,
)

__all__ = [
    "DenoisingLossProxy",
    "ProxyPruningOutput",
    "PruningAction",
    "PruningCandidate",
    "PruningPolicy",
    "PruningRound",
    "SearchPolicy",
    "TDCConfig",
    "flops_budgets",
    "proxy_prune",
    "prune_unet",
    "run_tdc",
]

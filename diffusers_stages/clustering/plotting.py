"""A picture of a clustering: its curves and similarity matrix with the chosen stage boundaries."""

from __future__ import annotations

import os
from typing import Union

from ..utils import atomic_file
from .segmentation import TimestepClusteringOutput


def plot_clustering(output: TimestepClusteringOutput, path: Union[str, os.PathLike], title: str | None = None):
    """
    Save a PNG: left, the method's per-timestep curves against ``t / T`` with the boundaries as vertical lines;
    right (when the method measured one), the similarity matrix of the grid with the boundaries. Written to a
    temporary file and renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = output.stages
    t_frac = output.grid_timesteps.double() / stages.num_train_timesteps
    cuts = [b / stages.num_train_timesteps for b in stages.boundaries]
    has_matrix = output.similarity is not None
    fig, axes = plt.subplots(1, 2 if has_matrix else 1, figsize=(11 if has_matrix else 5.5, 4.2), squeeze=False)
    ax = axes[0, 0]
    for name, curve in output.curves.items():
        ax.plot(t_frac.numpy(), curve.double().numpy(), label=name)
    if "loss" in output.curves:
        ax.set_yscale("log")
    for c in cuts:
        ax.axvline(c, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("t / T")
    ax.set_title("boundaries " + ", ".join(f"{c:.3f}" for c in cuts) if cuts else "one stage")
    ax.legend()
    if has_matrix:
        ax = axes[0, 1]
        extent = (float(t_frac[0]), float(t_frac[-1]), float(t_frac[-1]), float(t_frac[0]))
        im = ax.imshow(output.similarity.double().numpy(), extent=extent, cmap="viridis")
        for c in cuts:
            ax.axvline(c, color="w", linewidth=1)
            ax.axhline(c, color="w", linewidth=1)
        ax.set_xlabel("t / T")
        ax.set_ylabel("t / T")
        ax.set_title("similarity")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title or f"{stages.config.method} clustering, K = {stages.num_stages}")
    fig.tight_layout()
    path = os.fspath(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path

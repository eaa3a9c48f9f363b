"""A look at the study's samples: one row of final samples (seed 0, 13 NFE) per configuration, from the committed
``benchmarks/results/study_samples/<name>.npz`` files, written to ``docs/images/study_samples.png``.

    python benchmarks/plot_study_samples.py
    python benchmarks/plot_study_samples.py --names baseline edm_fdm --per_row 16 --output /tmp/grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NAMES = [
    "baseline", "baseline_long", "edm_fdm", "ms_balanced", "ms_balanced_fdm", "ddpm", "tdc",
    "deme_full_merged", "deme_full_control", "deme_full_plateau_merged", "deme_full_plateau_control",
]  # fmt: skip


def sample_rows(folder: Path, names: list[str], per_row: int) -> np.ndarray:
    """``[len(names), per_row, H, W]`` uint8: the first ``per_row`` samples of each ``<folder>/<name>.npz``."""
    rows = []
    for name in names:
        path = folder / f"{name}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run the study (benchmarks/cpu_study.sh) for {name!r}.")
        rows.append(np.load(path)["samples"][:per_row, 0])
    return np.stack(rows)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples_dir", type=Path, default=ROOT / "benchmarks/results/study_samples")
    p.add_argument("--names", nargs="+", default=DEFAULT_NAMES)
    p.add_argument("--per_row", type=int, default=24)
    p.add_argument("--output", type=Path, default=ROOT / "docs/images/study_samples.png")
    a = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sample_rows(a.samples_dir, a.names, a.per_row)
    n, k, h, w = rows.shape
    grid = np.pad(rows, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=128)  # a grey frame around each digit
    grid = grid.transpose(0, 2, 1, 3).reshape(n * (h + 2), k * (w + 2))
    fig, ax = plt.subplots(figsize=(k * 0.35 + 2.2, n * 0.38 + 0.3))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([(h + 2) * (i + 0.5) for i in range(n)], a.names, fontsize=8)
    ax.set_xticks([])
    fig.tight_layout()
    a.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.output, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {a.output}")
    return a.output


if __name__ == "__main__":
    main()

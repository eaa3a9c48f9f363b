"""Sample grids as PNG files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from diffusers.utils import make_image_grid

from ..data import tensor_to_pil
from ..utils import atomic_file


def save_image_grid(images: torch.Tensor, path: Union[str, os.PathLike], rows: int | None = None, scale: int = 1):
    """Save ``[N, C, H, W]`` images in ``[-1, 1]`` as a PNG grid (``rows`` defaults to about sqrt(N))."""
    pil = tensor_to_pil(images)
    n = len(pil)
    rows = rows or max(1, int(np.floor(np.sqrt(n))))
    cols = int(np.ceil(n / rows))
    pil += [pil[0].copy().point(lambda _: 0)] * (rows * cols - n)
    grid = make_image_grid(pil, rows=rows, cols=cols)
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), resample=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG")
    return grid

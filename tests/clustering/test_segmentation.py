import itertools

import pytest
import torch

from diffusers_stages.clustering import segment_contiguous
from diffusers_stages.clustering.segmentation import grid_edges, grid_timesteps


def objective(m, starts):
    edges = [0, *starts, len(m)]
    return sum(float(m[a:b, a:b].sum()) / (b - a) for a, b in zip(edges, edges[1:]))


def brute_force(m, k, first=1, last=None):
    last = len(m) - 1 if last is None else last
    best = max(itertools.combinations(range(first, last + 1), k - 1), key=lambda c: objective(m, list(c)))
    return list(best), objective(m, list(best))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_programme_is_optimal(k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(9, 4, generator=g, dtype=torch.float64)
    m = a @ a.T
    starts = segment_contiguous(m, k)
    assert len(starts) == k - 1 and starts == sorted(set(starts))
    assert objective(m, starts) == pytest.approx(brute_force(m, k)[1], rel=1e-12)


def test_recovers_blocks_and_respects_admissible_starts():
    m = torch.block_diag(torch.ones(3, 3), torch.ones(4, 4), torch.ones(2, 2)) * 0.9 + 0.1
    assert segment_contiguous(m, 3) == [3, 7]
    starts = segment_contiguous(m, 3, first=4, last=6)
    assert all(4 <= s <= 6 for s in starts)
    assert objective(m, starts) == pytest.approx(brute_force(m, 3, 4, 6)[1])


def test_bad_input():
    with pytest.raises(ValueError, match="num_stages"):
        segment_contiguous(torch.eye(4), 0)
    with pytest.raises(ValueError, match="num_stages"):
        segment_contiguous(torch.eye(4), 5)
    with pytest.raises(ValueError, match="square"):
        segment_contiguous(torch.ones(3, 4), 2)


def test_grid_cells_cover_the_time_range():
    assert grid_edges(1000, 4) == [0, 250, 500, 750, 1000]
    assert grid_timesteps(1000, 4).tolist() == [124, 374, 624, 874]
    assert grid_timesteps(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="grid_size"):
        grid_edges(10, 11)

"""benchmarks/plot_study_samples.py: one row per configuration, from the study's committed ``.npz`` format."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _plot_module():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("plot_study_samples")
    finally:
        sys.path.remove(str(BENCH))


def test_rows_hold_each_configuration_samples_in_order_and_the_grid_is_written(tmp_path):
    plot = _plot_module()
    for value, name in ((10, "a"), (200, "b")):
        np.savez(tmp_path / f"{name}.npz", samples=np.full((5, 1, 6, 6), value, dtype=np.uint8))
    rows = plot.sample_rows(tmp_path, ["b", "a"], per_row=3)
    assert rows.shape == (2, 3, 6, 6) and rows[0].min() == 200 and rows[1].max() == 10
    out = plot.main(
        ["--samples_dir", str(tmp_path), "--names", "a", "b", "--per_row", "4", "--output", str(tmp_path / "g.png")]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_configuration_says_how_to_produce_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the study.*'c'"):
        _plot_module().sample_rows(tmp_path, ["c"], per_row=2)

"""benchmarks/bench_stage_pipelines.py end to end at a tiny size: it runs every configuration and writes their times and
ratios. No timing is asserted (benchmarks are not timed tests)."""

import importlib
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_stage_pipeline_benchmark_runs_and_writes_its_ratios(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        bench = importlib.import_module("bench_stage_pipelines")
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "stage_pipelines.json"
    result = bench.main(["--steps", "3", "--repeats", "2", "--num_stages", "2", "--output", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    (row,) = result["rows"]
    assert row["steps"] == 3 and set(row["times_s"]) == {"merged", "fused", "unfused", "merged_copy"}
    assert all(len(ts) == 2 and min(ts) > 0 for ts in row["times_s"].values())
    for key in ("fused_over_merged", "unfused_over_merged", "control_over_merged", "fused_over_merged_from_switching"):
        assert row[key] > 0, key
    assert row["switching_s"] > 0

"""benchmarks/gpu_study.sh end to end on the CPU, shrunk by its pass-through arguments (bf16 kept): this checks its
plumbing (the device and wall-time records, a results folder of its own); its GPU figures need a GPU."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_study_script_writes_its_own_results_with_device_and_wall_time(tmp_path):
    env = dict(os.environ, STEPS="4", EVAL_EVERY="2", SEEDS="0", CONFIGS="baseline", OUT=str(tmp_path / "work"))
    env["RESULTS"] = str(tmp_path / "results")
    shrink = "--quick --resolution 8 --block_out_channels 8 16 --batch_size 8 --nfe 3 5 --default_nfe 5".split()
    shrink += "--curve_samples 24 --final_samples 32".split()
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh"), *shrink], env=env, check=True, cwd=tmp_path)
    results = tmp_path / "results"
    report = json.loads((results / "study.json").read_text())
    assert set(report["runs"]) == {"baseline"} and (results / "study_samples" / "baseline.npz").exists()
    assert (results / "device.txt").read_text().strip()  # the GPU's name, or says there was none
    assert "s wall for: STEPS=4" in (results / "wall_time.txt").read_text()

"""Start-up time of the ``diffusers-stages`` command (target: ``--help`` under 1 s).

Each command runs in a fresh interpreter with this checkout first on ``PYTHONPATH``, ``--repeats`` times,
interleaved; the medians of the wall time and of the CPU time (user + sys of the child: steadier on a loaded machine)
are reported, next to a bare ``python -c pass`` and a job's ``--help`` (which imports its config, hence torch).

    python benchmarks/bench_cli_startup.py                 # ~1 min on a quiet 2-core CPU
    python benchmarks/bench_cli_startup.py --repeats 1     # smoke run

Writes benchmarks/results/cli_startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "diffusers-stages --help": ["-m", "diffusers_stages.cli", "--help"],
    "diffusers-stages --version": ["-m", "diffusers_stages.cli", "--version"],
    "diffusers-stages train --help": ["-m", "diffusers_stages.cli", "train", "--help"],
}


def time_command(args: list[str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of ``python <args>`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=env, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--output", default=str(RESULTS / "cli_startup"), help="path without extension")
    args = p.parse_args(argv)
    samples = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            samples[name].append(time_command(command))
    rows = {
        name: {
            "wall_s": statistics.median(w for w, _ in runs),
            "cpu_s": statistics.median(c for _, c in runs),
            "repeats": len(runs),
        }
        for name, runs in samples.items()
    }
    result = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "commands": rows}
    table = ["| command | median wall (s) | median CPU (s) |", "|---|---|---|"]
    table += [f"| `{name}` | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |" for name, r in rows.items()]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.output + ".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return result


if __name__ == "__main__":
    main()

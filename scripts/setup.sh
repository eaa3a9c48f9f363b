#!/usr/bin/env bash
# Installs diffusers-stages for CPU work: torch's CPU build first, then the package under constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints-cpu.txt -e ".[test,dev]"

#!/usr/bin/env bash
# Runs the tests against the oldest dependency versions the package declares (constraints-min.txt, which holds the
# lower bounds of pyproject.toml), in a fresh virtual environment ($MIN_DEPS_VENV, else a temporary folder that is
# removed afterwards). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MIN_DEPS_VENV:-}" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    MIN_DEPS_VENV="$tmp/venv"
fi
python -m venv "$MIN_DEPS_VENV"
PY="$MIN_DEPS_VENV/bin/python"
"$PY" -m pip install -q --upgrade pip "setuptools>=77"
"$PY" -m pip install -q torch==2.13.0  # the CPU build first (see scripts/setup.sh)
"$PY" -m pip install -q -c constraints-min.txt ".[test]"
"$PY" -m pip list 2>/dev/null | grep -iE "^(diffusers|transformers|peft|accelerate|huggingface.hub|datasets|safetensors|torch) "
"$PY" -m pytest -q -x "$@"

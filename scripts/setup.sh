#!/usr/bin/env bash
# Set up preftune on a clean machine: a .venv with the CPU build of torch first (so pip does not
# pull a multi-GB CUDA build), then the project with its dev extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
    # torch==2.13.0 is the CPU build that lies on this machine's disk.
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]"
echo "preftune is installed in .venv: run '. .venv/bin/activate' then 'preftune --help'"

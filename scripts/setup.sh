#!/usr/bin/env bash
# Set up preftune on a clean machine: a .venv, PyTorch first, then the project with its dev extra.
# Safe to run again (an installed torch is kept).
#
# Which PyTorch build: pip resolves the package spec PREFTUNE_TORCH (default torch==2.13.0) against
# its configured index, or against PREFTUNE_TORCH_INDEX when that is set. On the public PyPI index,
# torch==2.13.0 for Linux x86_64 is the CUDA build (several GB of NVIDIA wheels); for the CPU-only
# build (~200 MB) point PREFTUNE_TORCH_INDEX at PyTorch's CPU wheel index:
#   PREFTUNE_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# Where pip is configured with a local wheel of torch==2.13.0 (as on the project's CI machines), the
# default takes that wheel. PREFTUNE_SETUP_DRY_RUN=1 prints the install commands without running them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${PREFTUNE_TORCH:-torch==2.13.0}
TORCH_INDEX=${PREFTUNE_TORCH_INDEX:-}
DRY=${PREFTUNE_SETUP_DRY_RUN:-}

run() {
    if [ -n "$DRY" ]; then echo "+ $*"; else "$@"; fi
}

if [ -n "$DRY" ]; then
    torch_cmd=(python -m pip install -q "$TORCH_SPEC")
    [ -n "$TORCH_INDEX" ] && torch_cmd+=(--index-url "$TORCH_INDEX")
    run "${torch_cmd[@]}"
    run python -m pip install -q -e ".[dev]"
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
    torch_cmd=(python -m pip install -q "$TORCH_SPEC")
    [ -n "$TORCH_INDEX" ] && torch_cmd+=(--index-url "$TORCH_INDEX")
    run "${torch_cmd[@]}"
fi
python -m pip install -q -e ".[dev]"
# after the project (numpy is there by now: torch warns when it imports without it)
python -c "import torch; print(f'torch {torch.__version__}: ' + (f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'))"
echo "preftune is installed in .venv: run '. .venv/bin/activate' then 'preftune --help'"

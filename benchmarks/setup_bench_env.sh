#!/usr/bin/env bash
# Build the benchmark's own environment, .bench-venv (git-ignored): the peer we compare against
# (TRL) is installed here only, never as a dependency of preftune.
#
#   bash benchmarks/setup_bench_env.sh        # safe to run again
#   .bench-venv/bin/python benchmarks/dpo_vs_trl.py --quick
#
# torch==2.13.0 goes in FIRST: it is the CPU build on this machine's disk, and installing it
# before anything else stops pip from pulling a multi-GB CUDA build as a dependency of trl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .bench-venv/bin/python ]; then
    "$PY" -m venv .bench-venv
fi
VPY=.bench-venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==2.13.0"
fi
# TRL pins its own transformers/accelerate/datasets ranges; let pip resolve them against the
# torch above, then install preftune (editable) so both sides run the same transformers.
"$VPY" -m pip install -q "trl==1.16.*"
"$VPY" -m pip install -q -e .
# The diffusers research script's side of diffusion_dpo_vs_diffusers.py: diffusers and peft at the
# versions of the main venv. torchvision (its image transforms) goes into a folder of its own that only
# that benchmark's script child puts on sys.path: the only torchvision wheel here is a CUDA build whose
# C ops cannot load with the CPU torch, and inside the venv it would break every transformers import.
"$VPY" -m pip install -q "diffusers==0.42.*" "peft==0.21.*"
if [ ! -d .bench-venv/diffusers-script-site/torchvision ]; then
    "$VPY" -m pip install -q --no-deps --target .bench-venv/diffusers-script-site "torchvision==0.28.0" \
        >/dev/null 2>&1 || echo "torchvision not installable; diffusion_dpo_vs_diffusers.py runs its preftune side only"
fi
# Optional: a sampling profiler for the "where does the time go" notes (skipped if unavailable).
"$VPY" -m pip install -q py-spy >/dev/null 2>&1 || echo "py-spy not installable; profiles use torch.profiler"
"$VPY" - <<'PY'
import accelerate, torch, transformers, trl
import preftune
print(f"bench env ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, trl {trl.__version__}, preftune {preftune.__version__}")
PY

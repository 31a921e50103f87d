#!/usr/bin/env bash
# Compile every numba.cuda kernel of tq to PTX without a GPU (scripts/cuda_compile_check.py): the
# typing check Numba's CUDA simulator skips. Builds, once, a scratch venv with numba-cuda and
# NVIDIA's libnvvm / NVRTC wheels (about 400 MB) under the tq cache directory; takes ~7 minutes
# on 2 cores, most of it NVVM.
#   bash scripts/cuda-compile-check.sh [--cc 9.0]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${TQ_CACHE_DIR:-$HOME/.cache/tq}/cuda-compile-venv"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.installed" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "numpy>=1.26,<2.5" "scipy>=1.11,<2" "numba>=0.60,<0.70" \
        "safetensors>=0.4,<0.9" "threadpoolctl>=3.1,<4" "numba-cuda>=0.30,<0.31" \
        nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12
    touch "$venv/.installed"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # tq from this checkout
exec "$venv/bin/python" "$root/scripts/cuda_compile_check.py" "$@"

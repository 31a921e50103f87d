#!/usr/bin/env bash
# The GPU checks, in one run on a machine with an NVIDIA GPU (the H200 lent through the device
# tool): the cuda kernel tests and the transformers cache store's (tests/test_device_stream.py, its
# bytes on cuda against the host caches') on the real GPU, then benchmarks/gpu.py for both rotations and
# benchmarks/attention_gpu.py (decode attention from the packed cache against torch fp16), and
# benchmarks/transformers_gpu.py (a transformers-engine perplexity job on cuda in bfloat16 against
# the same job on the CPU in float32; skipped, exit 2, without transformers or a corpus).
# Uses the machine's own python3 (numba-cuda, torch); tq is imported from this checkout.
#   [TQ_CORPUS_FILE=FILE] bash scripts/gpu-check.sh OUT_DIR
# FILE: the corpus's articles file (tq.data.corpus.write_corpus_files), for a machine offline
# without the corpus in $TQ_CACHE_DIR (docs/gpu.md).
set -uo pipefail
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
# The device image (2026-11) pairs numba-cuda 0.30 with NumPy 2.5, which removed np.row_stack that
# numba-cuda still calls when it compiles; alias it for these runs only.
shim="$(mktemp -d)"
printf 'import numpy\nif not hasattr(numpy, "row_stack"):\n    numpy.row_stack = numpy.vstack\n' \
    >"$shim/sitecustomize.py"
export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import numba, numpy, torch; print('numba', numba.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"
    python3 -c "import numba_cuda; print('numba-cuda', numba_cuda.__version__)" 2>/dev/null
} 2>&1 | tee "$out/environment.txt"
status=0
python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py tests/test_device.py tests/test_device_stream.py \
    tests/test_attention_cuda.py "tests/test_attention.py::test_device_cuda_runs_the_gpu_kernels" \
    "tests/test_attention.py::test_bench_record_on_cuda" 2>&1 \
    | tee "$out/tests.txt" || status=1
for rotation in haar hadamard; do
    python3 benchmarks/gpu.py --rotation "$rotation" --json "$out/gpu_$rotation.json" 2>&1 \
        | tee "$out/gpu_$rotation.txt" || status=1
done
python3 benchmarks/attention_gpu.py --json "$out/attention_gpu.json" 2>&1 \
    | tee "$out/attention_gpu.txt" || status=1
# Exit 2: transformers or the corpus is missing here; pip gets one short try at PyPI (offline).
PIP_RETRIES=0 PIP_TIMEOUT=10 python3 benchmarks/transformers_gpu.py --json "$out/transformers_gpu.json" \
    2>&1 | tee "$out/transformers_gpu.txt"
job=${PIPESTATUS[0]}
if [ "$job" -eq 2 ]; then
    echo "transformers_gpu: skipped (exit 2; see $out/transformers_gpu.txt)" | tee -a "$out/transformers_gpu.txt"
elif [ "$job" -ne 0 ]; then
    status=1
fi
exit $status

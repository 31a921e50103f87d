"""Compile every numba.cuda kernel of tq to PTX without a GPU: the typing check the simulator skips.

Numba's CUDA simulator runs kernels as Python, so a kernel that Numba cannot type for a real GPU
(a runtime-sized shared array, an int64/uint64 mix promoted to float64, ...) passes the tests
there and fails on the first real launch. This script runs tq's GPU entry points with every
kernel launch replaced by ``numba.cuda.compile_ptx`` for one compute capability, over a grid of
shapes, bit widths, strategies and rotations, and exits non-zero naming each failure.

Needs numba-cuda and NVIDIA's libnvvm / NVRTC from PyPI, no driver and no GPU; run it through
``scripts/cuda-compile-check.sh``, which builds that environment once in a scratch venv and puts
this checkout on its PYTHONPATH.

    python scripts/cuda_compile_check.py [--cc 9.0]
"""

from __future__ import annotations

import argparse
import itertools
import os
import traceback
import types

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numba
import numpy as np
from numba import cuda


def install_compile_only_launches(cc: tuple[int, int], compiled: dict) -> None:
    """Kernel launches compile PTX for ``cc`` instead of running; device memory is host memory."""
    import numba.cuda.dispatcher as dispatcher_module

    def compile_launch(self, _config):
        def launch(*args):
            signature = tuple(numba.typeof(arg) for arg in args)
            key = (self.py_func.__qualname__, id(self), signature)
            if key not in compiled:
                compiled[key] = len(cuda.compile_ptx(self.py_func, signature, cc=cc)[0])

        return launch

    dispatcher_module.CUDADispatcher.__getitem__ = compile_launch
    dispatcher_module.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    cuda.to_device = lambda array, *args, **kwargs: np.ascontiguousarray(array)
    cuda.device_array = lambda shape, dtype=np.float32, *args, **kwargs: np.empty(shape, dtype)


def cases():
    """(label, call) pairs covering the kernels' compile-time parameters."""
    import tq.kernels.cuda as kernels
    from tq.cache.attention_cuda import DeviceKVCache, decode_attention_cuda
    from tq.cache.config import CacheConfig
    from tq.cache.kvcache import QuantizedKVCache
    from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd

    rng = np.random.default_rng(0)
    for dim in (20, 128, 3000):  # odd, the usual head_dim, and past the staged-matrix limit
        for bits in (1, 2, 3, 4, 8):
            rotations = ("haar", "hadamard") if dim & (dim - 1) == 0 else ("haar",)
            for rotation, normalize in itertools.product(rotations, (True, False)):
                x = rng.standard_normal((5, dim)).astype(np.float32)
                queries = rng.standard_normal((3, dim)).astype(np.float32)
                mse = TurboQuantMSE(dim, bits, normalize=normalize, rotation=rotation, seed=1)

                def run_mse(q=mse, x=x, queries=queries):
                    codes, norms = kernels.mse_encode(x, q.rotation, q.codebook, q.normalize)
                    kernels.mse_decode(codes, norms, q.rotation, q.codebook)
                    kernels.mse_scores(queries, codes, norms, q.rotation, q.codebook)

                yield f"mse d={dim} b={bits} {rotation} normalize={normalize}", run_mse
                if bits < 2:
                    continue
                prod = TurboQuantProd(dim, bits, normalize=normalize, rotation=rotation, seed=1)

                def run_prod(q=prod, x=x, queries=queries):
                    codes, signs, gammas, norms = kernels.prod_encode(
                        x, q.rotation, q.qjl, q.codebook, q.normalize
                    )
                    kernels.prod_decode(codes, signs, gammas, norms, q.rotation, q.qjl, q.codebook)
                    kernels.prod_scores(queries, codes, signs, gammas, norms, q.rotation, q.qjl, q.codebook)

                yield f"prod d={dim} b={bits} {rotation} normalize={normalize}", run_prod
    configs = {
        "mse4": CacheConfig(),
        "mse1/8": CacheConfig(key_bits=1, value_bits=8),
        "mse3/5": CacheConfig(key_bits=3, value_bits=5),
        "prod3": CacheConfig(key_strategy="prod", key_bits=3, value_bits=3),
        "prod values": CacheConfig(key_strategy="prod", value_strategy="prod"),
        "fractional": CacheConfig(key_bits=2.5, value_bits=3.5, residual_length=4),
        "exact keys": CacheConfig(key_strategy="exact", value_bits=3),
        "exact values": CacheConfig(value_strategy="exact", key_bits=2),
        "hadamard renormalize": CacheConfig(rotation="hadamard", renormalize=True, residual_length=8),
    }
    for name, config in configs.items():
        for dim in (64, 128) if config.rotation == "hadamard" else (20, 64, 128):
            cache = QuantizedKVCache(2, dim, config)
            cache.append(rng.standard_normal((2, 40, dim)), rng.standard_normal((2, 40, dim)))

            def run_attention(cache=cache, dim=dim):
                device_cache = DeviceKVCache(cache)
                for q_heads, n_queries in ((2, 1), (8, 1), (4, 5)):
                    queries = rng.standard_normal((q_heads, n_queries, dim)).astype(np.float32)
                    decode_attention_cuda(queries, device_cache, 0.1)

            yield f"attention {name} d={dim}", run_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability to compile for (default 9.0)")
    args = parser.parse_args()
    cc = tuple(int(part) for part in args.cc.split("."))
    compiled: dict = {}
    install_compile_only_launches(cc, compiled)
    import tq.kernels.attention_cuda as attention_cuda
    import tq.kernels.attention_cuda_plan as attention_plan
    import tq.kernels.cuda as kernels

    # the "device" arrays are host arrays (no copies back), and the default split needs a GPU size
    def results(on_device, *arrays):
        return arrays[0] if len(arrays) == 1 else arrays

    kernels.results = attention_cuda.results = results
    attention_plan.multiprocessors = lambda: 132
    failures = []
    for label, call in cases():
        try:
            call()
        except Exception:  # every failure is reported; the exit code says so
            failures.append(label)
            print(f"FAILED {label}\n{traceback.format_exc(limit=3)}", flush=True)
    print(f"compiled {len(compiled)} kernel specializations for sm_{cc[0]}{cc[1]}; {len(failures)} failures")
    if failures:
        raise SystemExit("cuda_compile_check: " + "; ".join(failures))


if __name__ == "__main__":
    main()

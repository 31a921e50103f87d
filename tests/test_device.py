"""Choosing where the kernels run: ``device="cpu" | "cuda" | "auto"`` on quantizers, caches, the
CLI and the pipeline's synthetic stage (tq.kernels.resolve_device).

Without an NVIDIA GPU, "cuda" runs on Numba's CUDA simulator (tests/__init__.py turns it on), at
small sizes; the kernels themselves are checked in test_kernels_cuda.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tq import TurboQuantMSE, TurboQuantProd
from tq.cache.config import CacheConfig
from tq.cache.kvcache import QuantizedKVCache
from tq.kernels import DeviceUnavailableError, gpu_present, is_gpu_array, resolve_device

NO_GPU = not Path("/dev/nvidia0").exists()
needs_cuda_backend = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and NO_GPU,
    reason="no NVIDIA GPU and Numba's CUDA simulator is off",
)


def rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_cpu_is_the_default_and_bad_devices_are_named():
    assert TurboQuantMSE(16, 2).device == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        TurboQuantMSE(16, 2, device="gpu")
    with pytest.raises(ValueError, match="device must be one of"):
        CacheConfig(device="tpu")


@pytest.mark.skipif(not NO_GPU, reason="checks the machine without a GPU")
def test_auto_never_picks_the_simulator():
    assert not gpu_present()
    assert resolve_device("auto") == "cpu"
    assert TurboQuantProd(16, 3, device="auto").device == "cpu"


@pytest.mark.skipif(not NO_GPU, reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    script = (
        "from tq import TurboQuantMSE\n"
        "from tq.kernels import DeviceUnavailableError\n"
        "try:\n"
        "    TurboQuantMSE(16, 2, device='cuda')\n"
        "except DeviceUnavailableError as error:\n"
        "    print(error)\n"
    )
    env = os.environ | {"NUMBA_ENABLE_CUDASIM": "0"}
    run = {"capture_output": True, "text": True, "env": env}
    result = subprocess.run([sys.executable, "-c", script], check=True, **run)
    assert "device='cuda' needs an NVIDIA GPU" in result.stdout
    bench = ["bench", "--device", "cuda", "--quick", "--dim", "16", "--bits", "2"]
    cli = subprocess.run([sys.executable, "-m", "tq.cli", *bench], **run)
    assert cli.returncode != 0
    assert "device='cuda' needs an NVIDIA GPU" in cli.stderr


def test_cpu_backends_do_not_mix_with_cuda():
    with pytest.raises((ValueError, DeviceUnavailableError)):
        TurboQuantMSE(16, 2, kernels="naive", device="cuda")


@needs_cuda_backend
@pytest.mark.parametrize("quantizer_type", [TurboQuantMSE, TurboQuantProd])
def test_cuda_quantizers_match_the_cpu(quantizer_type):
    x = rows(24, 32, seed=1)
    on_cpu = quantizer_type(32, 3, normalize=True)
    on_gpu = quantizer_type(32, 3, normalize=True, device="cuda")
    assert on_gpu.device == "cuda"
    cpu_batch, gpu_batch = on_cpu.quantize(x), on_gpu.quantize(x)
    # Codes may differ only for coordinates on a cell edge, which random data does not hit.
    np.testing.assert_array_equal(gpu_batch.codes, cpu_batch.codes)
    np.testing.assert_allclose(gpu_batch.norms, cpu_batch.norms, rtol=1e-6)
    np.testing.assert_allclose(on_gpu.dequantize(gpu_batch), on_cpu.dequantize(cpu_batch), atol=1e-5)
    queries = rows(3, 32, seed=2)
    np.testing.assert_allclose(
        on_gpu.inner_products(queries, gpu_batch), on_cpu.inner_products(queries, cpu_batch), atol=1e-4
    )


@needs_cuda_backend
def test_gpu_arrays_are_read_in_place():
    from numba import cuda

    x = rows(16, 16, seed=3)
    on_gpu = TurboQuantMSE(16, 2, normalize=True, device="cuda")
    from_device = on_gpu.quantize(cuda.to_device(x))
    np.testing.assert_array_equal(from_device.codes, on_gpu.quantize(x).codes)
    scores = on_gpu.inner_products(cuda.to_device(x[:2]), from_device)
    assert is_gpu_array(scores)
    np.testing.assert_allclose(scores.copy_to_host(), on_gpu.inner_products(x[:2], from_device), atol=1e-6)
    with pytest.raises(TypeError, match="float32"):
        on_gpu.quantize(cuda.to_device(x.astype(np.float64)))
    with pytest.raises(TypeError, match="use device='cuda'"):
        TurboQuantMSE(16, 2, normalize=True).quantize(cuda.to_device(x))


@needs_cuda_backend
def test_a_cache_quantizes_on_the_chosen_device():
    keys, values = rows(2 * 12, 16, seed=4).reshape(2, 12, 16), rows(2 * 12, 16, seed=5).reshape(2, 12, 16)
    caches = {}
    for device in ("cpu", "cuda"):
        cache = QuantizedKVCache(2, 16, CacheConfig(key_bits=3, value_bits=2, device=device))
        cache.append(keys, values)
        caches[device] = cache
    np.testing.assert_allclose(caches["cuda"].keys(), caches["cpu"].keys(), atol=1e-5)
    np.testing.assert_allclose(caches["cuda"].values(), caches["cpu"].values(), atol=1e-5)

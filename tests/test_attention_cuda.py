"""The CUDA decode attention (tq.cache.attention_cuda; its kernels: tq.kernels.attention_cuda)
against the float64 oracle (tq.cache.attention.decode_attention_reference) and
reconstruct-then-attend.

Without a GPU these run on Numba's CUDA simulator (tests/__init__.py), a Python thread per CUDA
thread: caches are tiny (1-2 KV heads, head_dim 16-32, a few dozen tokens), and split_tokens=16
makes several token splits (the combine kernel merges them) out of few tokens. Tolerance: max
|out - truth| <= 1e-5 * max |truth|, tests/test_attention.py's, for the same float32 arithmetic
(scores and value sums in float32, ~1e-6 relative; a wrong channel, token, rotation or QJL term
moves outputs by >= 1e-2 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import cuda

from tests.test_attention import CONFIGS, TOLERANCE, assert_close, random_cache, truth
from tq.cache.attention import decode_attention_reference
from tq.cache.attention_cuda import DeviceKVCache, decode_attention_cuda
from tq.cache.config import CacheConfig
from tq.cache.kvcache import QuantizedKVCache
from tq.kernels import is_gpu_array

ROOT = Path(__file__).resolve().parent.parent
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(autouse=True, scope="module")
def short_switch_interval():
    """The simulator's block threads meet at every barrier; a short GIL switch interval gets
    them there about twice as fast (and changes nothing on a GPU)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(before)


def cuda_cache(config: CacheConfig, kv_heads: int = 1, dim: int = 32, spans=(20, 1, 9)) -> QuantizedKVCache:
    """tests/test_attention.py's random cache, at a size the simulator runs in a second or two."""
    return random_cache(config, kv_heads=kv_heads, dim=dim, spans=spans)


def queries_for(cache: QuantizedKVCache, q_heads: int, n_queries: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((q_heads, n_queries, cache.head_dim)).astype(np.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_the_oracle(name) -> None:
    cache = cuda_cache(CONFIGS[name])
    queries = queries_for(cache, 2, 1)  # GQA: 2 query heads on 1 KV head
    out = decode_attention_cuda(queries, DeviceKVCache(cache), 0.3, split_tokens=16)
    assert_close(out, decode_attention_reference(queries, cache, 0.3))
    assert_close(out, truth(queries, cache, 0.3))


def test_gqa_several_heads_and_queries_on_the_device() -> None:
    """2 KV heads, 4 query heads, 2 queries each (m = 4 per KV head); head_dim 20 (a padded
    last chunk); device queries in, a device array out; the upload is reused."""
    cache = cuda_cache(CacheConfig(key_bits=3.5, value_bits=2, residual_length=5), kv_heads=2, dim=20)
    device_cache = DeviceKVCache(cache)
    queries = queries_for(cache, 4, 2)
    out = decode_attention_cuda(cuda.to_device(queries), device_cache, 0.25)
    assert is_gpu_array(out)
    assert_close(out.copy_to_host(), truth(queries, cache, 0.25))
    again = queries[:2, :1] * 2  # m = 1 per KV head
    assert_close(decode_attention_cuda(again, device_cache, 0.25), truth(again, cache, 0.25))


def test_more_queries_than_a_tile_and_large_logits() -> None:
    """m = 10 queries per KV head: two query tiles of 8; logits of ~100 (max subtraction)."""
    cache = cuda_cache(CacheConfig(key_bits=2, value_bits=4), dim=16, spans=(12, 8))
    queries = queries_for(cache, 5, 2) * 30
    out = decode_attention_cuda(queries, DeviceKVCache(cache), 1.0)
    assert np.all(np.isfinite(out))
    assert_close(out, truth(queries, cache, 1.0))


def test_device_cache_attributes() -> None:
    cache = cuda_cache(CacheConfig(residual_length=6), kv_heads=2, dim=32)
    device_cache = DeviceKVCache(cache)
    assert (device_cache.kv_heads, device_cache.head_dim, device_cache.length) == (2, 32, 30)
    # per quantized token and head: 16 code bytes + a 4-byte norm, per stream; exact: 32 floats
    assert device_cache.read_nbytes == 2 * 2 * (24 * (16 + 4) + 6 * 32 * 4)
    assert device_cache.nbytes > device_cache.read_nbytes
    assert "length=30" in repr(device_cache)


def test_errors() -> None:
    cache = cuda_cache(CacheConfig(), spans=(5,), kv_heads=2)
    device_cache = DeviceKVCache(cache)
    good = np.zeros((4, 1, 32), np.float32)
    with pytest.raises(ValueError, match="multiple of the cache's kv_heads"):
        decode_attention_cuda(np.zeros((3, 1, 32), np.float32), device_cache, 1.0)
    with pytest.raises(ValueError, match="shape"):
        decode_attention_cuda(np.zeros((4, 32), np.float32), device_cache, 1.0)
    with pytest.raises(ValueError, match="shape"):
        decode_attention_cuda(np.zeros((4, 1, 16), np.float32), device_cache, 1.0)
    with pytest.raises(TypeError, match="float numpy array"):
        decode_attention_cuda(good.astype(np.int32), device_cache, 1.0)
    with pytest.raises(TypeError, match="float32"):
        decode_attention_cuda(cuda.to_device(good.astype(np.float64)), device_cache, 1.0)
    with pytest.raises(TypeError, match="DeviceKVCache"):
        decode_attention_cuda(good, cache, 1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        decode_attention_cuda(np.full((4, 1, 32), np.nan, np.float32), device_cache, 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        decode_attention_cuda(good, device_cache, float("inf"))
    with pytest.raises(TypeError, match="scale must be a number"):
        decode_attention_cuda(good, device_cache, True)
    with pytest.raises(ValueError, match="split_tokens"):
        decode_attention_cuda(good, device_cache, 1.0, split_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        DeviceKVCache(QuantizedKVCache(2, 32))
    with pytest.raises(TypeError, match="QuantizedKVCache"):
        DeviceKVCache(cache.keys())
    with pytest.raises(NotImplementedError, match="'kivi'"):
        DeviceKVCache(cuda_cache(CacheConfig(key_strategy="kivi"), spans=(40,)))
    with pytest.raises(NotImplementedError, match="renormalize"):
        DeviceKVCache(cuda_cache(CacheConfig(key_strategy="prod", renormalize=True)))


# ---------------------------------------------------------------------------------------------
# benchmarks/attention_gpu.py


def _run_benchmark(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "attention_gpu.py"),
            "--json",
            str(tmp_path / "a.json"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the script must find the tq package by itself
        env=os.environ.copy(),  # NUMBA_ENABLE_CUDASIM (tests/__init__.py) and TQ_CACHE_DIR
    )


SMOKE = (
    "--context 40 --heads 1 --q-heads 2 --dim 16 --bits 4 --repeats 1 --warmup 0 --check-context 16".split()
)


def test_benchmark_smoke_run(tmp_path) -> None:
    result = _run_benchmark(tmp_path, "--allow-simulator", *SMOKE)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["simulated"] is SIMULATED and record["passed"] is True
    assert record["config"]["context"] == 40 and record["config"]["q_heads"] == 2
    rows = {row["impl"]: row for row in record["rows"]}
    packed = rows["tq decode_attention_cuda"]
    assert packed["median_ms"] > 0 and packed["gb_per_s"] > 0
    assert packed["bytes_read"] == 2 * 40 * (8 + 4)  # 16 coordinates at 4 bits + a norm, K and V
    assert rows["torch fp16"]["bytes_read"] == 2 * 40 * 16 * 2
    if SIMULATED:
        assert "skipped" in rows["torch fp16"]
    assert record["check"]["cpu_max_relative"] <= TOLERANCE
    assert "decode_attention_cuda" in result.stdout  # the table


@pytest.mark.skipif(not SIMULATED, reason="a real GPU is present: the simulator is not in use")
def test_benchmark_refuses_the_simulator_unless_allowed(tmp_path) -> None:
    result = _run_benchmark(tmp_path, *SMOKE)
    assert result.returncode != 0
    assert "--allow-simulator" in result.stderr
    assert not (tmp_path / "a.json").exists()

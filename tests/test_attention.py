"""Decode attention from the packed cache (tq.cache.attention) against reconstruct-then-attend.

The truth is float64 softmax attention over ``cache.keys()`` / ``cache.values()``: the same
stored tokens, so the only differences are round-off, not quantization error. Tolerance: max
|out - truth| <= 1e-5 * max |truth| (TOLERANCE). Why: the reconstruction is float32 (relative
round-off ~6e-8 per operation over d = 64..128 term sums and a d x d rotation, ~1e-6 relative in
a logit of size ~1-10), the fast path scores and accumulates in float32 as well; a logit error e
changes a softmax weight by a relative e, so outputs agree to a few 1e-6 relative (measured:
<= 1e-6). 1e-5 leaves a margin while still failing on any real mistake (a wrong channel, token,
rotation or QJL term moves outputs by >= 1e-2 relative).
"""

from __future__ import annotations

import numpy as np
import pytest

from tq.cache.attention import decode_attention, decode_attention_reference
from tq.cache.config import CacheConfig
from tq.cache.kvcache import QuantizedKVCache
from tq.tasks.attention import run_attention

TOLERANCE = 1e-5
IMPLEMENTATIONS = [decode_attention, decode_attention_reference]


def truth(queries: np.ndarray, cache: QuantizedKVCache, scale: float, start: int = 0, new=None) -> np.ndarray:
    """float64 softmax(scale q K^T) V on the reconstruction of tokens start.. and the exact new
    (keys, values), GQA by repeating KV heads."""
    group = queries.shape[0] // cache.kv_heads
    keys, values = cache.keys()[:, start:], cache.values()[:, start:]
    if new is not None:
        keys, values = np.concatenate([keys, new[0]], axis=1), np.concatenate([values, new[1]], axis=1)
    keys = np.repeat(keys.astype(np.float64), group, axis=0)
    values = np.repeat(values.astype(np.float64), group, axis=0)
    scores = np.einsum("hqd,htd->hqt", queries.astype(np.float64), keys) * scale
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hqt,htd->hqd", weights, values)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert error <= TOLERANCE, error


def random_cache(config: CacheConfig, kv_heads: int = 2, dim: int = 64, spans=(50, 1, 30), seed: int = 0):
    """A cache filled in several appends (several packed pieces per channel group)."""
    rng = np.random.default_rng(seed)
    cache = QuantizedKVCache(kv_heads, dim, config)
    for t in spans:
        keys = rng.standard_normal((kv_heads, t, dim)) * np.linspace(0.5, 3.0, dim)  # uneven channels
        cache.append(keys, rng.standard_normal((kv_heads, t, dim)))
    return cache


CONFIGS = {  # shared with tests/test_attention_cuda.py
    "mse1": CacheConfig(key_bits=1, value_bits=1),
    "mse2": CacheConfig(key_bits=2, value_bits=2),
    "mse3": CacheConfig(key_bits=3, value_bits=3),
    "mse4": CacheConfig(),
    "mse8": CacheConfig(key_bits=8, value_bits=8),
    "mse5-7": CacheConfig(key_bits=5, value_bits=7),
    "prod2": CacheConfig(key_strategy="prod", key_bits=2, value_bits=2),
    "prod3": CacheConfig(key_strategy="prod", key_bits=3, value_bits=3),
    "prod4-values": CacheConfig(key_strategy="prod", value_strategy="prod"),
    "prod7-values": CacheConfig(key_strategy="prod", value_strategy="prod", value_bits=7),
    "frac2.5-3.5": CacheConfig(key_bits=2.5, value_bits=3.5),
    "frac3.5-prod": CacheConfig(key_strategy="prod", key_bits=3.5, value_bits=2.5, residual_length=4),
    "window": CacheConfig(residual_length=10),
    "window-all": CacheConfig(residual_length=500),
    "exact-keys": CacheConfig(key_strategy="exact", value_bits=3),
    "exact-values": CacheConfig(value_strategy="exact", key_bits=3),
    "hadamard": CacheConfig(rotation="hadamard", key_bits=2.5, residual_length=3),
    "renormalize": CacheConfig(renormalize=True, key_bits=3, value_bits=2.5),
    "fp16-norms": CacheConfig(norm_dtype="float16", key_strategy="prod"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_matches_reconstruct_then_attend(name, attention) -> None:
    cache = random_cache(CONFIGS[name])
    queries = np.random.default_rng(1).standard_normal((6, 3, 64)).astype(np.float32)  # GQA 6 on 2
    assert_close(attention(queries, cache, 0.3), truth(queries, cache, 0.3))


@pytest.mark.parametrize("name", ["mse3", "prod3", "frac3.5-prod", "window", "exact-keys"])
@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
@pytest.mark.parametrize("start", [0, 20, 60, 81])
def test_window_and_new_tokens(name, attention, start) -> None:
    """``start`` (a sliding window: from inside the quantized tokens, in the exact window, or
    past every cached token) and exact ``new_keys`` / ``new_values`` after the cached tokens."""
    cache = random_cache(CONFIGS[name])  # 81 tokens
    rng = np.random.default_rng(5)
    new = rng.standard_normal((2, 2, 2, 64)).astype(np.float32)
    queries = rng.standard_normal((4, 1, 64)).astype(np.float32)
    out = attention(queries, cache, 0.3, start=start, new_keys=new[0], new_values=new[1])
    assert_close(out, truth(queries, cache, 0.3, start, new))
    if start < len(cache):
        assert_close(attention(queries, cache, 0.3, start=start), truth(queries, cache, 0.3, start))


@pytest.mark.parametrize("name", ["mse3", "prod3", "frac3.5-prod", "window", "exact-values"])
def test_cache_without_reconstruction(name) -> None:
    """A cache that keeps no float copy of its quantized tokens stores the same codes: the same
    attention, the same keys() (rebuilt from the codes), the same nbytes, smaller buffers."""
    kept = random_cache(CONFIGS[name])
    packed = QuantizedKVCache(2, 64, CONFIGS[name], keep_reconstruction=False)
    rng = np.random.default_rng(0)  # random_cache's draws, replayed
    for t in (50, 1, 30):
        keys = rng.standard_normal((2, t, 64)) * np.linspace(0.5, 3.0, 64)
        packed.append(keys, rng.standard_normal((2, t, 64)))
    queries = np.random.default_rng(1).standard_normal((4, 2, 64)).astype(np.float32)
    assert_close(decode_attention(queries, packed, 0.3), truth(queries, kept, 0.3))
    for part in ("keys", "values"):
        expected, scale = getattr(kept, part)(), np.abs(getattr(kept, part)()).max()
        np.testing.assert_allclose(getattr(packed, part)(), expected, rtol=0, atol=1e-6 * scale)
    assert packed.nbytes == kept.nbytes
    assert packed.buffer_nbytes < kept.buffer_nbytes


def test_one_token_one_head_and_large_logits() -> None:
    cache = random_cache(CacheConfig(key_bits=3), kv_heads=1, dim=32, spans=(1,))
    queries = np.random.default_rng(2).standard_normal((1, 1, 32)) * 100  # float64 queries
    assert_close(decode_attention(queries, cache, 1.0), truth(queries, cache, 1.0))
    big = random_cache(CacheConfig(), kv_heads=1, dim=32, spans=(40,))
    queries = np.random.default_rng(3).standard_normal((2, 1, 32)).astype(np.float32) * 50
    assert np.all(np.isfinite(decode_attention(queries, big, 1.0)))  # no overflow: max subtracted
    assert_close(decode_attention(queries, big, 1.0), truth(queries, big, 1.0))


def test_many_tokens_use_several_thread_chunks(monkeypatch) -> None:
    monkeypatch.setenv("TQ_NUM_THREADS", "2")
    cache = random_cache(CacheConfig(key_strategy="prod", key_bits=3, value_bits=4), spans=(5000,))
    queries = np.random.default_rng(4).standard_normal((4, 2, 64)).astype(np.float32)
    assert_close(decode_attention(queries, cache, 0.125), truth(queries, cache, 0.125))


@pytest.mark.parametrize(
    "config",
    [
        CacheConfig(),
        CacheConfig(key_strategy="prod", key_bits=3, value_bits=2, residual_length=32),
        CacheConfig(key_bits=2.5, value_bits=3.5, rotation="hadamard"),
    ],
    ids=["mse4", "prod3-window", "frac-hadamard"],
)
def test_real_trace(smollm2_traces, config) -> None:
    """SmolLM2-135M-Instruct's own keys, values and queries (layers 0 and 15: 512 Wikipedia
    tokens, 16 queries; real outlier channels and peaked attention) through a cache in two
    appends; every query attends to all 512 tokens (no causal mask: the check is packed vs
    reconstructed attention over the same stored tokens)."""
    for trace in smollm2_traces:
        cache = QuantizedKVCache(1, trace.head_dim, config)
        cache.append(trace.keys[:, :300], trace.values[:, :300])
        cache.append(trace.keys[:, 300:], trace.values[:, 300:])
        queries, scale = trace.queries[:1], 1 / np.sqrt(trace.head_dim)  # logit = q . k / sqrt(d)
        for attention in IMPLEMENTATIONS:
            assert_close(attention(queries, cache, scale), truth(queries, cache, scale))


def test_errors() -> None:
    cache = random_cache(CacheConfig(), spans=(5,))
    good = np.zeros((4, 1, 64), np.float32)
    with pytest.raises(ValueError, match="multiple of the cache's kv_heads"):
        decode_attention(np.zeros((3, 1, 64), np.float32), cache, 1.0)
    with pytest.raises(ValueError, match="shape"):
        decode_attention(np.zeros((4, 64), np.float32), cache, 1.0)
    with pytest.raises(ValueError, match="shape"):
        decode_attention(np.zeros((4, 1, 32), np.float32), cache, 1.0)
    with pytest.raises(TypeError, match="float numpy array"):
        decode_attention(good.astype(np.int32), cache, 1.0)
    with pytest.raises(TypeError, match="QuantizedKVCache"):
        decode_attention(good, cache.keys(), 1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        decode_attention(np.full((4, 1, 64), np.nan, np.float32), cache, 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        decode_attention(good, cache, float("inf"))
    with pytest.raises(ValueError, match="empty"):
        decode_attention(good, QuantizedKVCache(2, 64), 1.0)
    with pytest.raises(NotImplementedError, match="'kivi'"):
        decode_attention(good, random_cache(CacheConfig(key_strategy="kivi"), spans=(40,)), 1.0)
    with pytest.raises(NotImplementedError, match="'uniform'"):
        decode_attention(good, random_cache(CacheConfig(value_strategy="uniform"), spans=(5,)), 1.0)
    with pytest.raises(NotImplementedError, match="renormalize"):
        decode_attention(good, random_cache(CacheConfig(key_strategy="prod", renormalize=True)), 1.0)
    with pytest.raises(ValueError, match=r"start must be an integer in \[0, 5\]"):
        decode_attention(good, cache, 1.0, start=6)
    with pytest.raises(ValueError, match="together"):
        decode_attention(good, cache, 1.0, new_keys=np.zeros((2, 1, 64), np.float32))
    with pytest.raises(ValueError, match="new_values must have shape"):
        decode_attention(good, cache, 1.0, new_keys=good[:2], new_values=good[:1])
    with pytest.raises(ValueError, match="empty"):
        decode_attention(good, cache, 1.0, start=5)


def test_device_cuda_runs_the_gpu_kernels() -> None:
    """device="cuda" (here Numba's simulator) and a DeviceKVCache reach tq.cache.attention_cuda."""
    from tq.cache.attention_cuda import DeviceKVCache

    cache = random_cache(CacheConfig(key_bits=3), kv_heads=1, dim=16, spans=(20,))
    queries = np.random.default_rng(6).standard_normal((2, 1, 16)).astype(np.float32)
    expected = truth(queries, cache, 0.3)
    assert_close(decode_attention(queries, cache, 0.3, device="cuda"), expected)
    device_cache = DeviceKVCache(cache)
    assert_close(decode_attention(queries, device_cache, 0.3), expected)
    with pytest.raises(ValueError, match="DeviceKVCache"):
        decode_attention(queries, device_cache, 0.3, device="cpu")


def test_bench_record() -> None:
    record = run_attention(context=300, dim=32, bits=3.5, kv_heads=2, q_heads=4, strategy="prod", repeats=5)
    assert record["config"]["workload"] == "attention"
    assert record["metrics"]["relative_error"] <= TOLERANCE
    assert record["metrics"]["bytes_read_float"] == 2 * 300 * 2 * 32 * 4
    assert record["metrics"]["bytes_read_packed"] < record["metrics"]["bytes_read_float"]
    assert set(record["timing"]["seconds"]) == {"packed", "float"}
    with pytest.raises(ValueError, match="multiple"):
        run_attention(context=10, kv_heads=2, q_heads=3)


def test_bench_record_on_cuda() -> None:
    """The GPU path of the workload: the baseline is torch fp16 on a GPU with a CUDA torch, else
    (Numba's simulator, CPU torch) NumPy's float32, and the record says which."""
    from tq.tasks.attention import _cuda_torch

    record = run_attention(context=24, dim=16, bits=2, kv_heads=1, q_heads=2, repeats=5, device="cuda")
    assert record["config"]["device"] == "cuda"
    assert record["metrics"]["relative_error"] <= TOLERANCE
    fp16 = _cuda_torch() is not None
    assert record["timing"]["baseline"].startswith("torch fp16" if fp16 else "numpy float32")
    assert record["metrics"]["bytes_read_baseline"] == record["metrics"]["bytes_read_float"] // (1 + fp16)


def test_cli_attention_workload(tmp_path, capsys) -> None:
    import json

    from tq.cli import main

    out = tmp_path / "attention.json"
    argv = ["bench", "--workload", "attention", "--context", "300", "--dim", "32", "--bits", "3"]
    assert main([*argv, "--kv-heads", "2", "--q-heads", "4", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["config"]["workload"] == "attention" and record["config"]["context"] == 300
    assert record["metrics"]["relative_error"] < 1e-5
    assert "speedup" in capsys.readouterr().out

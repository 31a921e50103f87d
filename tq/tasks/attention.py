"""The attention workload: one decode step of attention from the packed cache vs the float path.

A :class:`~tq.cache.kvcache.QuantizedKVCache` of ``context`` random tokens (standard normal keys and
values, kv_heads x head_dim) is built in one append; one decode step (``q_heads`` queries, one
per query head, grouped-query attention over ``kv_heads``) is timed two ways:

- ``packed``: :func:`tq.cache.attention.decode_attention`, scores and value sums from the codes (on
  "cuda": the packed streams uploaded once as a ``DeviceKVCache``, the queries on the GPU);
- ``float``: the baseline on the cache's reconstruction (``cache.keys()`` / ``cache.values()``):
  on "cpu" float32 attention in NumPy (scores K q, a max-subtracted softmax, then p V); on
  "cuda" the same in torch fp16 on the GPU (:func:`torch_fp16_attention`), or NumPy's when torch
  has no CUDA (the record's ``timing.baseline`` names which ran).

Metrics: ``relative_error`` max |packed - float| / max |float| over all outputs (the two compute
the same function of the same stored tokens, so this is float32 round-off, not quantization
error); ``bytes_read_packed`` (everything the cache stores: codes, norms, QJL signs and gammas,
outlier channel indices, exact window), ``bytes_read_float`` (fp32 keys and values) and
``bytes_read_baseline`` (what the timed baseline reads: fp16 for torch) per step, and the ratio
of the first two. Timing: median seconds of ``repeats`` rounds after one warm-up round, the two
runs taking turns within a round (tq.tasks.synthetic.median_seconds); on the GPU, wall-clock
time up to a device synchronize (benchmarks/attention_gpu.py times the kernels alone with CUDA
events).

The record's source is "synthetic" (random tokens, no model); its config names the workload
"attention".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tq.cache.attention import decode_attention
from tq.cache.config import CacheConfig
from tq.cache.kvcache import QuantizedKVCache
from tq.cache.strategies import QUANTIZER_STRATEGIES
from tq.kernels import gpu_present, resolve_device
from tq.kernels.cpu import num_threads
from tq.tasks.records import make_record
from tq.tasks.synthetic import Progress, median_seconds


def float_attention(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """float32 softmax(scale * q K^T) V: queries [q_heads, m, d], keys and values
    [kv_heads, n, d] (query head h uses KV head h // (q_heads // kv_heads)) -> [q_heads, m, d]."""
    kv_heads = keys.shape[0]
    group = queries.shape[0] // kv_heads
    out = np.empty(queries.shape, np.float32)
    for head in range(kv_heads):
        q = queries[head * group : (head + 1) * group].reshape(-1, queries.shape[2])
        scores = q @ keys[head].T
        scores *= np.float32(scale)
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)
        result = scores @ values[head]
        result /= scores.sum(axis=1, keepdims=True)
        out[head * group : (head + 1) * group] = result.reshape(group, -1, queries.shape[2])
    return out


def torch_fp16_attention(
    torch: Any, queries: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float
) -> Callable[[], Any]:
    """A call computing fp16 attention on the GPU with torch (q K^T, softmax, then V) for the
    shapes of :func:`float_attention`; the inputs are copied to the GPU once, here. The call
    returns a CUDA fp16 tensor [q_heads, m, d] without synchronizing."""
    device = torch.device("cuda")
    keys_fp16 = torch.from_numpy(np.ascontiguousarray(keys)).to(device, torch.float16)
    values_fp16 = torch.from_numpy(np.ascontiguousarray(values)).to(device, torch.float16)
    q_heads, m, dim = queries.shape
    grouped = torch.from_numpy(queries).to(device, torch.float16).reshape(keys.shape[0], -1, dim)

    def attend() -> Any:
        scores = torch.matmul(grouped, keys_fp16.transpose(1, 2)) * scale
        return torch.matmul(torch.softmax(scores, dim=-1), values_fp16).reshape(q_heads, m, dim)

    return attend


def _cuda_torch() -> Any:
    """torch when it can run on a real GPU, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() and gpu_present() else None


def _timed_calls(
    queries: np.ndarray, cache: QuantizedKVCache, keys: np.ndarray, values: np.ndarray, scale: float,
    device: str,
) -> tuple[dict[str, Callable[[], object]], str, int]:  # fmt: skip
    """({"packed": call, "float": call}, the baseline's name, bytes the baseline reads)."""
    float32_bytes = keys.nbytes + values.nbytes
    numpy_float = lambda: float_attention(queries, keys, values, scale)  # noqa: E731
    if device == "cpu":
        packed_cpu = lambda: decode_attention(queries, cache, scale, device="cpu")  # noqa: E731
        return {"packed": packed_cpu, "float": numpy_float}, "numpy float32 (cpu)", float32_bytes
    from numba import cuda

    from tq.cache.attention_cuda import DeviceKVCache

    device_cache, device_queries = DeviceKVCache(cache), cuda.to_device(queries)

    def packed() -> None:
        decode_attention(device_queries, device_cache, scale)
        cuda.synchronize()

    torch = _cuda_torch()
    if torch is None:
        return {"packed": packed, "float": numpy_float}, "numpy float32 (cpu; no CUDA torch)", float32_bytes
    attend = torch_fp16_attention(torch, queries, keys, values, scale)

    def fp16() -> None:
        attend()
        torch.cuda.synchronize()

    return {"packed": packed, "float": fp16}, "torch fp16 (cuda)", float32_bytes // 2


def run_attention(
    context: int = 32768,
    dim: int = 128,
    bits: float = 4,
    kv_heads: int = 8,
    q_heads: int = 32,
    strategy: str = "mse",
    repeats: int = 5,
    seed: int = 0,
    device: str = "cpu",
    n_queries: int = 1,
) -> dict[str, Any]:
    """Time one decode step of attention from the packed cache against float32 attention on the
    reconstruction; return a result record (source "synthetic", config workload "attention").

    Args:
        context: cached tokens (all quantized: residual_length 0).
        dim: head_dim.
        bits: key and value width (fractional widths allowed, e.g. 3.5).
        kv_heads, q_heads: KV heads of the cache and query heads (a multiple of kv_heads).
        strategy: key strategy, "mse" or "prod" (values are always "mse").
        repeats: timed runs (>= 5); the median is reported.
        seed: seed of the data and of the cache's rotations.
        device: where decode_attention and the cache's quantization run: "cpu", "cuda" or
            "auto" (a GPU if present); "cuda" times the baseline in torch fp16 on the GPU.
        n_queries: queries per query head (1 for a decode step).
    """
    if strategy not in QUANTIZER_STRATEGIES:
        raise ValueError(f"strategy must be one of {QUANTIZER_STRATEGIES}, got {strategy!r}")
    if context < 1 or n_queries < 1:
        raise ValueError(f"context and n_queries must be at least 1, got {context} and {n_queries}")
    if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if repeats < 5:
        raise ValueError(f"repeats must be at least 5 (timings are medians), got {repeats}")
    device = resolve_device(device)
    progress = Progress(f"tq bench attention n={context} d={dim} b={bits} {strategy}", after_s=0.0)
    config = CacheConfig(
        key_bits=bits, value_bits=bits, key_strategy=strategy, value_strategy="mse", seed=seed, device=device
    )
    cache = QuantizedKVCache(kv_heads, dim, config)
    rng = np.random.default_rng([seed, context, dim])
    start = time.perf_counter()
    cache.append(
        rng.standard_normal((kv_heads, context, dim), dtype=np.float32),
        rng.standard_normal((kv_heads, context, dim), dtype=np.float32),
    )
    progress(f"cache built in {time.perf_counter() - start:.1f} s; checking")
    queries = rng.standard_normal((q_heads, n_queries, dim), dtype=np.float32)
    scale = 1.0 / math.sqrt(dim)
    keys, values = cache.keys(), cache.values()
    calls, baseline, baseline_bytes = _timed_calls(queries, cache, keys, values, scale, device)
    packed = decode_attention(queries, cache, scale, device=device)
    reference = float_attention(queries, keys, values, scale)
    relative_error = float(np.max(np.abs(packed - reference)) / np.max(np.abs(reference)))
    seconds = median_seconds(calls, repeats, progress)
    metrics = {
        "relative_error": relative_error,
        "bytes_read_packed": cache.nbytes,
        "bytes_read_float": cache.float_nbytes,
        "bytes_read_baseline": baseline_bytes,
        "bytes_ratio": cache.float_nbytes / cache.nbytes,
    }
    timing = {
        "repeats": repeats,
        "statistic": "median",
        "baseline": baseline,
        "seconds": seconds,
        "speedup": seconds["float"] / seconds["packed"],
        "packed_tokens_per_s": context * kv_heads / seconds["packed"],
        "float_tokens_per_s": context * kv_heads / seconds["float"],
    }
    record_config = {
        "workload": "attention",
        "context": context,
        "dim": dim,
        "bits": bits,
        "kv_heads": kv_heads,
        "q_heads": q_heads,
        "n_queries": n_queries,
        "strategy": strategy,
        "value_strategy": "mse",
        "seed": seed,
        "device": device,
    }
    progress(f"packed {seconds['packed'] * 1e3:.1f} ms, float {seconds['float'] * 1e3:.1f} ms")
    return make_record("synthetic", record_config, metrics, timing, num_threads())

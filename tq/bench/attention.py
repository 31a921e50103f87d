"""The attention workload: one decode step of attention from the packed cache vs the float path.

A :class:`~tq.kvcache.QuantizedKVCache` of ``context`` random tokens (standard normal keys and
values, kv_heads x head_dim) is built in one append; one decode step (``q_heads`` queries, one
per query head, grouped-query attention over ``kv_heads``) is timed two ways:

- ``packed``: :func:`tq.attention.decode_attention`, scores and value sums from the codes;
- ``float``: float32 attention in NumPy on the cache's reconstruction (``cache.keys()`` /
  ``cache.values()``): scores K q, a max-subtracted softmax, then p V.

Metrics: ``relative_error`` max |packed - float| / max |float| over all outputs (the two compute
the same function of the same stored tokens, so this is float32 round-off, not quantization
error); ``bytes_read_packed`` (everything the cache stores: codes, norms, QJL signs and gammas,
outlier channel indices, exact window) and ``bytes_read_float`` (fp32 keys and values) per step,
and their ratio. Timing: median seconds of ``repeats`` rounds after one warm-up round, the two
runs taking turns within a round (tq.bench.synthetic.median_seconds).

The record's source is "synthetic" (random tokens, no model); its config names the workload
"attention".
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from tq.attention import decode_attention
from tq.bench.synthetic import Progress, median_seconds
from tq.kernels.cpu import num_threads
from tq.kvcache import CacheConfig, QuantizedKVCache
from tq.records import make_record

STRATEGIES = ("mse", "prod")


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
        device: where decode_attention and the cache's quantization run ("cpu" only for now).
        n_queries: queries per query head (1 for a decode step).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if context < 1 or n_queries < 1:
        raise ValueError(f"context and n_queries must be at least 1, got {context} and {n_queries}")
    if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a positive multiple of kv_heads ({kv_heads})")
    if repeats < 5:
        raise ValueError(f"repeats must be at least 5 (timings are medians), got {repeats}")
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
    packed = decode_attention(queries, cache, scale, device=device)
    reference = float_attention(queries, keys, values, scale)
    relative_error = float(np.max(np.abs(packed - reference)) / np.max(np.abs(reference)))
    seconds = median_seconds(
        {
            "packed": lambda: decode_attention(queries, cache, scale, device=device),
            "float": lambda: float_attention(queries, keys, values, scale),
        },
        repeats,
        progress,
    )
    metrics = {
        "relative_error": relative_error,
        "bytes_read_packed": cache.nbytes,
        "bytes_read_float": cache.float_nbytes,
        "bytes_ratio": cache.float_nbytes / cache.nbytes,
    }
    timing = {
        "repeats": repeats,
        "statistic": "median",
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

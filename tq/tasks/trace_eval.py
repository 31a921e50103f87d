"""The trace workload: what a quantized KV cache does to attention on real per-head traces.

For every sample of a :class:`~tq.data.trace.KvTrace`, the sample's keys and values go through a
:class:`~tq.cache.kvcache.QuantizedKVCache` (one KV head), and every query attends causally to the
keys up to its position (scores q . k / sqrt(d)), once with the exact and once with the
reconstructed cache. Metrics, averaged over all queries of all samples:

- ``score_rmse``: root mean square error of the attention scores (keys quantized);
  ``score_rmse_relative``: the same divided by the standard deviation of the exact scores.
- ``softmax_kl``: KL(exact || quantized) of the attention distributions, in nats (keys
  quantized, values exact).
- ``topk_overlap``: |top-k(exact) & top-k(quantized)| / k, k = min(top_k, keys visible).
- ``output_relative_error``: ||o~ - o|| / ||o|| of the attention output softmax(s) V with keys
  and values both quantized.
- ``compression_ratio``: fp32 bytes / stored bytes of the cache; ``key_bits``, ``value_bits``
  (code bits per coordinate) and ``stored_bits_per_coordinate`` (everything stored).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from tq.cache.config import CacheConfig
from tq.cache.kvcache import QuantizedKVCache
from tq.data.trace import KvTrace
from tq.kernels.cpu import num_threads
from tq.tasks.records import make_record
from tq.tasks.synthetic import Progress

DEFAULT_TOP_K = 8


def _masked_scores(queries: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Scores float64 [n_queries, seq] = q . k / sqrt(d), -inf beyond each query's position."""
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T / np.sqrt(keys.shape[1])
    visible = np.arange(keys.shape[0])[None, :] <= positions[:, None]
    return np.where(visible, scores, -np.inf)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _topk_overlap(exact: np.ndarray, quantized: np.ndarray, positions: np.ndarray, top_k: int) -> np.ndarray:
    """Per query: the share of the exact top-k keys that are also in the quantized top-k."""
    overlaps = np.empty(exact.shape[0])
    for row, position in enumerate(positions):
        k = min(top_k, int(position) + 1)
        visible = slice(0, int(position) + 1)
        best_exact = np.argpartition(-exact[row, visible], k - 1)[:k]
        best_quantized = np.argpartition(-quantized[row, visible], k - 1)[:k]
        overlaps[row] = len(np.intersect1d(best_exact, best_quantized)) / k
    return overlaps


def attention_errors(
    trace: KvTrace, keys: np.ndarray, values: np.ndarray, top_k: int = DEFAULT_TOP_K
) -> dict[str, float]:
    """Attention metrics of reconstructed keys/values [samples, seq, d] against the trace's own."""
    squared, spread, kl, overlap, output_error = [], [], [], [], []
    for sample in range(len(trace)):
        queries, positions = trace.queries[sample], trace.query_positions[sample]
        exact = _masked_scores(queries, trace.keys[sample], positions)
        quantized = _masked_scores(queries, keys[sample], positions)
        visible = np.isfinite(exact)
        squared.append((exact[visible] - quantized[visible]) ** 2)
        spread.append(exact[visible])
        p, q = _softmax(exact), _softmax(quantized)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
        kl.append(terms.sum(axis=1))
        overlap.append(_topk_overlap(exact, quantized, positions, top_k))
        reference = p @ trace.values[sample].astype(np.float64)
        approximate = q @ values[sample].astype(np.float64)
        norms = np.linalg.norm(reference, axis=1)
        output_error.append(np.linalg.norm(approximate - reference, axis=1) / np.where(norms > 0, norms, 1.0))
    rmse = float(np.sqrt(np.mean(np.concatenate(squared))))
    deviation = float(np.std(np.concatenate(spread)))
    return {
        "score_rmse": rmse,
        "score_rmse_relative": rmse / deviation if deviation > 0 else 0.0,
        "softmax_kl": float(np.mean(np.concatenate(kl))),
        "topk_overlap": float(np.mean(np.concatenate(overlap))),
        "output_relative_error": float(np.mean(np.concatenate(output_error))),
    }


def run_trace(path: str | os.PathLike, config: CacheConfig, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """Measure one trace file under one cache configuration; return a ``trace`` result record."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    trace = KvTrace.load(path)
    visible = int(trace.query_positions.max()) + 1
    if top_k >= visible:
        raise ValueError(
            f"top_k {top_k} is not below the {visible} keys the trace's queries see at most: every "
            "visible key would be in the top-k and the overlap would be 1 by construction"
        )
    progress = Progress(f"tq bench trace {os.fspath(path)}")
    keys = np.empty_like(trace.keys)
    values = np.empty_like(trace.values)
    nbytes = float_nbytes = 0
    start = time.perf_counter()
    caches = []
    for sample in range(len(trace)):
        cache = QuantizedKVCache(1, trace.head_dim, config, layer=trace.layer)
        cache.append(trace.keys[sample][None], trace.values[sample][None])
        keys[sample], values[sample] = cache.keys()[0], cache.values()[0]
        nbytes += cache.nbytes
        float_nbytes += cache.float_nbytes
        caches.append(cache)
        progress(f"sample {sample + 1}/{len(trace)} quantized")
    seconds = time.perf_counter() - start
    metrics = attention_errors(trace, keys, values, top_k)
    bits = caches[0].bits_per_coordinate()
    metrics.update(
        {
            "compression_ratio": float_nbytes / nbytes,
            "key_bits": bits["key_code_bits"],
            "value_bits": bits["value_code_bits"],
            "stored_bits_per_coordinate": 8 * nbytes / (2 * trace.keys.size),
            "nbytes": nbytes,
            "float_nbytes": float_nbytes,
        }
    )
    record_config = {
        "workload": "trace",
        "trace": os.fspath(path),
        "model": trace.model,
        "layer": trace.layer,
        "head": trace.head,
        "rope": trace.rope,
        "samples": len(trace),
        "seq_len": trace.seq_len,
        "head_dim": trace.head_dim,
        "queries_per_sample": trace.n_queries,
        "top_k": top_k,
        "cache": config.describe(),
    }
    timing = {"cache_fill_seconds": seconds, "tokens_per_s": trace.keys.shape[0] * trace.seq_len / seconds}
    return make_record("trace", record_config, metrics, timing, num_threads())

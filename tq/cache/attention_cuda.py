"""Decode attention from the packed cache on an NVIDIA GPU: the CUDA path of
:func:`tq.cache.attention.decode_attention`, with the same semantics (see that module's docstring).

    device_cache = DeviceKVCache(cache)      # upload the packed streams once
    out = decode_attention_cuda(queries, device_cache, scale)

This module turns a cache's packed view (:mod:`tq.cache.packed_view`) into the arrays the
numba.cuda kernels read (each channel group's rotation, centroids, codes, per-token scales, and
for Prod its QJL matrix, signs and weights) and checks the queries; the kernels, the device layout
and the launch are :mod:`tq.kernels.attention_cuda`'s.

Shapes and units. ``queries`` float [q_heads, n_queries, head_dim] (NumPy, or a float32 GPU
array); query head h attends with KV head h // (q_heads // kv_heads); the result is float32
[q_heads, n_queries, head_dim], a NumPy array for NumPy queries and a Numba device array for GPU
queries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tq.cache.kvcache import QuantizedKVCache
from tq.cache.packed_view import (
    PackedCache,
    PackedGroup,
    PackedStream,
    check_host_queries,
    check_query_shape,
    check_scale,
    packed_cache,
)
from tq.kernels import is_gpu_array
from tq.kernels.attention_cuda import DeviceStreams, GroupArrays, StreamArrays, attention
from tq.kernels.naive import qjl_scale

__all__ = ["DeviceKVCache", "decode_attention_cuda"]


def _group_arrays(group: PackedGroup) -> GroupArrays:
    """A packed channel group as the kernels read it; a Prod group's weights are
    sqrt(pi/2)/size * gamma * scale per token."""
    quantizer, prod = group.quantizer, group.signs is not None
    return GroupArrays(
        group.channels,
        quantizer.rotation.matrix,
        quantizer.codebook.centroids,
        group.codes,
        group.scales,
        qjl=quantizer.qjl if prod else None,
        signs=group.signs,
        weights=qjl_scale(group.channels.shape[1]) * group.gammas.astype(np.float64) * group.scales
        if prod
        else None,
    )


def _stream_arrays(stream: PackedStream) -> StreamArrays:
    """A packed stream as the kernels read it."""
    return StreamArrays(
        tuple(_group_arrays(group) for group in stream.groups), stream.quantized, stream.exact
    )


class DeviceKVCache(DeviceStreams):
    """A snapshot of a :class:`~tq.cache.kvcache.QuantizedKVCache`'s packed streams on the GPU (or of
    a :class:`~tq.cache.packed_view.PackedCache`: a window of it, with new exact tokens).

    Uploaded once (for repeated decode steps and benchmarks); later appends to the cache are not
    seen. Strategies "mse", "prod" and "exact" (anything else: NotImplementedError, as for
    :func:`tq.cache.attention.decode_attention`).

    Attributes:
        kv_heads, head_dim: of the cache.
        length: tokens (quantized and exact).
        nbytes: device bytes held (packed streams, exact tokens, offsets, rotation matrices).
        read_nbytes: bytes one attention pass reads from the cache: codes, signs, per-token
            scales and weights, exact tokens (not the matrices and centroids, a few KiB per head).
    """

    def __init__(self, cache: QuantizedKVCache | PackedCache) -> None:
        view = cache if isinstance(cache, PackedCache) else packed_cache(cache)
        super().__init__(_stream_arrays(view.keys), _stream_arrays(view.values))


def _check(queries: Any, cache: DeviceKVCache, scale: float) -> float:
    """Validate the arguments (the kernels check the dtype) -> the scale."""
    if not isinstance(cache, DeviceKVCache):
        raise TypeError(
            f"cache must be a DeviceKVCache (DeviceKVCache(quantized_cache) uploads one), "
            f"got {type(cache).__name__}"
        )
    scale = check_scale(scale)
    if is_gpu_array(queries):
        check_query_shape(tuple(queries.shape), cache.kv_heads, cache.head_dim)
    else:
        check_host_queries(queries, cache.kv_heads, cache.head_dim)
    return scale


def decode_attention_cuda(
    queries: Any, cache: DeviceKVCache, scale: float, split_tokens: int | None = None
) -> Any:
    """softmax(scale * q K^T) V for every query, on the GPU, from the packed cache.

    Args:
        queries: float [q_heads, n_queries, head_dim]: a NumPy array (any float dtype; checked
            for NaN and inf), or a float32 GPU array (used in place, not checked for NaN);
            q_heads a multiple of cache.kv_heads; query head h attends with KV head
            h // (q_heads // kv_heads), every query to every token (no causal mask).
        cache: the :class:`DeviceKVCache` of the layer.
        scale: softmax scale of the logits q . k, e.g. 1 / sqrt(head_dim).
        split_tokens: tokens per block (default: from the cache length and the GPU's size).

    Returns:
        float32 [q_heads, n_queries, head_dim]: NumPy for NumPy queries, else a Numba device
        array (ready on the default stream).

    Raises:
        TypeError, ValueError: bad types, shapes, non-finite host input, a bad split.
    """
    return attention(queries, cache, _check(queries, cache, scale), split_tokens)

"""A quantized cache's packed streams as plain arrays: what the attention kernels read.

:func:`packed_cache` turns a layer's :class:`~tq.cache.kvcache.QuantizedKVCache` into a
:class:`PackedCache` of NumPy arrays per KV head (views of the stored batches), optionally
restricted to its most recent tokens (a sliding window) and extended by new exact tokens that
are not in the cache yet (the current decode step's own keys and values). The CPU path
(:mod:`tq.cache.attention`) and the GPU path (:mod:`tq.cache.attention_cuda`, which hands its
arrays to :mod:`tq.kernels.attention_cuda`) both read it, so data and imports flow one way:
cache -> packed view -> kernels. The argument checks that both
entry points share live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tq.cache.kvcache import QuantizedKVCache
from tq.cache.stream import StreamStore
from tq.core.packing import unpack_codes
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd


@dataclass(frozen=True)
class PackedGroup:
    """One channel group's quantized tokens of every KV head, in token order.

    codes uint8 [kv_heads, n, bytes]; scales float32 [kv_heads, n] (the norms, or for a
    renormalized "mse" stream norm / |c[idx]|); signs uint8 [kv_heads, n, ceil(size/8)] and
    gammas float32 [kv_heads, n] for Prod (else None); channels int64 [kv_heads, size].
    """

    quantizer: TurboQuantMSE | TurboQuantProd
    channels: np.ndarray
    codes: np.ndarray
    scales: np.ndarray
    signs: np.ndarray | None
    gammas: np.ndarray | None


@dataclass(frozen=True)
class PackedStream:
    """A stream's quantized tokens (channel groups, ``quantized`` tokens each) followed by its
    exact tokens float32 [kv_heads, e, head_dim]."""

    groups: list[PackedGroup]
    quantized: int
    exact: np.ndarray

    @property
    def length(self) -> int:
        return self.quantized + self.exact.shape[1]

    def window(self, start: int, new: np.ndarray | None) -> PackedStream:
        """Tokens start.. of this stream, then the exact tokens ``new`` [kv_heads, n, head_dim]."""
        cut = min(start, self.quantized)
        groups = []
        if cut < self.quantized:
            groups = [
                replace(
                    g,
                    codes=g.codes[:, cut:],
                    scales=g.scales[:, cut:],
                    signs=None if g.signs is None else g.signs[:, cut:],
                    gammas=None if g.gammas is None else g.gammas[:, cut:],
                )
                for g in self.groups
            ]
        exact = self.exact[:, start - cut :]
        if new is not None:
            exact = np.concatenate([exact, new], axis=1)
        return PackedStream(groups, self.quantized - cut, exact)


@dataclass(frozen=True)
class PackedCache:
    """Keys and values of one layer as packed arrays; ``length`` tokens attended to."""

    kv_heads: int
    head_dim: int
    keys: PackedStream
    values: PackedStream

    @property
    def length(self) -> int:
        return self.keys.length


def packed_stream(store: StreamStore, name: str) -> PackedStream:
    """One stream's packed data per KV head: views of its batches, merged into one per channel
    group first (``StreamStore.merge_pieces``).

    Raises:
        NotImplementedError: a baseline or fp8 strategy, centred keys, or renormalize with "prod".
    """
    if not store.kind.packed_attention:
        raise NotImplementedError(
            f"attention from the packed cache does not support {name} strategy {store.strategy!r} "
            "(baseline strategies are out of scope); use 'mse', 'prod' or 'exact', or attend over "
            f"cache.{name}s()"
        )
    if store.center is not None:
        raise NotImplementedError(
            f"attention from the packed cache does not support centred {name}s (center_keys); attend "
            f"over cache.{name}s(), which adds the mean back"
        )
    if store.strategy == "prod" and store.config.renormalize:
        raise NotImplementedError(
            f"attention from the packed cache does not support renormalize=True with {name} strategy 'prod'"
        )
    kv_heads = store.kv_heads
    if not store.kind.quantizes:
        return PackedStream([], 0, store.view())
    store.merge_pieces()
    groups = []
    for group in store.groups:
        if not group.pieces:
            continue
        ((batch, start, stop),) = group.pieces
        piece, t = batch.rows(start, stop), (stop - start) // kv_heads
        codes, scales = piece.codes.reshape(kv_heads, t, -1), piece.norms.reshape(kv_heads, t)
        if store.config.renormalize:  # the reconstruction is rescaled to the stored norm
            quantizer = group.quantizer
            centroids = quantizer.codebook.centroids.astype(np.float64)
            indices = unpack_codes(piece.codes, group.channels.shape[1], quantizer.bits)
            lengths = np.sqrt(np.sum(centroids[indices] ** 2, axis=1)).reshape(scales.shape)
            scales = np.where(lengths > 0, scales / np.where(lengths > 0, lengths, 1.0), 0.0)
            scales = scales.astype(np.float32)
        prod = isinstance(group.quantizer, TurboQuantProd)
        groups.append(
            PackedGroup(
                group.quantizer,
                group.channels,
                codes,
                scales,
                piece.signs.reshape(kv_heads, t, -1) if prod else None,
                piece.gammas.reshape(kv_heads, t) if prod else None,
            )
        )
    return PackedStream(groups, store.quantized, store.exact())


def packed_cache(
    cache: object,
    start: int = 0,
    new_keys: np.ndarray | None = None,
    new_values: np.ndarray | None = None,
) -> PackedCache:
    """The packed view of a layer's cache: its tokens start..len(cache)-1, then the exact
    ``new_keys`` / ``new_values`` float [kv_heads, n, head_dim] (both or neither).

    Raises:
        TypeError, ValueError: not a QuantizedKVCache, a bad start, bad new tokens, or nothing
            to attend to.
        NotImplementedError: see :func:`packed_stream`.
    """
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a QuantizedKVCache, got {type(cache).__name__}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= len(cache):
        raise ValueError(f"start must be an integer in [0, {len(cache)}] (the cache's tokens), got {start!r}")
    if (new_keys is None) != (new_values is None):
        raise ValueError("give new_keys and new_values together, or neither")
    if new_keys is not None:  # checked as an append would check them
        new_keys = cache._check("new_keys", new_keys, cache._keys)
        new_values = cache._check("new_values", new_values, cache._values)
        if new_keys.shape[1] != new_values.shape[1]:
            raise ValueError(
                f"new_keys have {new_keys.shape[1]} tokens but new_values have {new_values.shape[1]}"
            )
    keys = packed_stream(cache._keys, "key").window(int(start), new_keys)
    values = packed_stream(cache._values, "value").window(int(start), new_values)
    if keys.length == 0:
        raise ValueError("the cache is empty: there is nothing to attend to")
    return PackedCache(cache.kv_heads, cache.head_dim, keys, values)


def check_scale(scale: object) -> float:
    """The softmax scale as a float; TypeError or ValueError for a non-number or non-finite one."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a number, got {scale!r}")
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_query_shape(shape: tuple[int, ...], kv_heads: int, head_dim: int) -> None:
    """ValueError unless ``shape`` is [q_heads, n_queries, head_dim], q_heads a multiple of kv_heads."""
    if len(shape) != 3 or shape[2] != head_dim or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"queries must have shape [q_heads, n_queries, {head_dim}] with q_heads, "
            f"n_queries >= 1, got {list(shape)}"
        )
    if shape[0] % kv_heads:
        raise ValueError(f"q_heads ({shape[0]}) must be a multiple of the cache's kv_heads ({kv_heads})")


def check_host_queries(queries: object, kv_heads: int, head_dim: int) -> None:
    """TypeError unless a float NumPy array, ValueError for a bad shape (check_query_shape) or a
    NaN or inf (naming the first)."""
    if not isinstance(queries, np.ndarray) or queries.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(
            f"queries must be a float numpy array, got {getattr(queries, 'dtype', type(queries).__name__)}"
        )
    check_query_shape(queries.shape, kv_heads, head_dim)
    finite = np.isfinite(queries)
    if not finite.all():
        head, query, _ = np.argwhere(~finite)[0]
        raise ValueError(f"queries contain NaN or inf (head {head}, query {query})")

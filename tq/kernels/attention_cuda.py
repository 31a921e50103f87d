"""Decode attention over packed key and value streams on an NVIDIA GPU (numba.cuda), arrays in,
arrays out: the kernels behind :mod:`tq.cache.attention_cuda` (which builds the arrays from a
quantized cache and checks the queries).

    streams = DeviceStreams(keys, values)        # StreamArrays of keys and values, uploaded once
    out = attention(queries, streams, scale)

Shapes and units. A stream (:class:`StreamArrays`) is ``quantized`` tokens stored as channel
groups (:class:`GroupArrays`: at most two per stream, each with its own rotation and codes), then
exact tokens float [kv_heads, e, head_dim]. ``queries`` float [q_heads, n_queries, head_dim]
(NumPy, or a float32 GPU array); query head h attends with KV head h // (q_heads // kv_heads);
the result is float32 [q_heads, n_queries, head_dim], a NumPy array for NumPy queries and a Numba
device array for GPU queries. Per KV head the kernels work on m = (q_heads // kv_heads) *
n_queries queries.

What is uploaded (:class:`DeviceStreams`). Each channel group's codes and Prod sign bits are
stored as little-endian uint32 words, each token's row padded to whole words (no padding at all
for head_dim 128), all groups in one flat word buffer; the per-token scales, the Prod weights
sqrt(pi/2)/size * gamma * scale, the exact tokens and the centroids in one flat float32 buffer;
their offsets in a small int64 array (so a launch passes a handful of arrays: Numba's launch cost
grows with every argument). Per KV head, a key matrix [head_dim, Wk] maps a query to its rotated
coordinates of every key group (Pi^T and, for Prod, S^T, scattered from the group's channels:
q[:, channels] @ Pi^T = q @ M) and a value matrix [Wv, head_dim] maps rotated value sums back
(Pi, and S for Prod, into the group's channels).

Three kernels per call (flash-decoding, split-K over tokens; :mod:`tq.kernels.attention_cuda_kernels`):
project the queries, attend (scores, the split's softmax statistics and value sums per block of
``split`` tokens and up to 8 queries), combine the splits. :mod:`tq.kernels.attention_cuda_plan`
chooses what they are compiled for and describes the device layout.

Every packed byte is read once per query tile (QT queries share a pass; m > QT reads the cache
m / QT times), with coalesced loads; the partial sums add 4 * (Wv [+ head_dim]) bytes per
(split, query), about 1% of the bytes read at 4 bits with the default split. Index arithmetic is
unsigned (:mod:`tq.kernels.cuda_device`). Accumulation is float32.

Measured: correctness on Numba's CUDA simulator against the float64 oracle
(tests/test_attention_cuda.py). Not measured here: speed on a GPU (benchmarks/attention_gpu.py
times it against torch fp16 attention on the reconstructed cache; run scripts/gpu-check.sh on a
GPU). The design aims at memory bandwidth (about 136 bytes per token and KV head at 4-bit
head_dim 128, against 512 for fp16 keys and values); the centroid look-ups (one shared-memory
load per coordinate) are the likely next limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda

from tq.kernels import is_gpu_array
from tq.kernels.attention_cuda_kernels import attend_kernel, combine_kernel, project
from tq.kernels.attention_cuda_plan import LAYOUT_SLOTS, MAX_GROUPS, Part, Spec, plan
from tq.kernels.cuda_device import THREADS, results, to_device_floats

__all__ = ["DeviceStreams", "GroupArrays", "StreamArrays", "attention"]


@dataclass(frozen=True)
class GroupArrays:
    """One channel group of a stream, every KV head: ``size`` channels quantized at ``bits``.

    channels int64 [kv_heads, size]: the head's channels the group holds; rotation Pi float
    [size, size] (the rotated coordinates are x[channels] @ Pi^T); centroids float [2^bits];
    codes uint8 [kv_heads, n, ceil(size * bits / 8)] (layout of :mod:`tq.core.packing`);
    scales float [kv_heads, n]: what a token's centroids are multiplied by (its norm). Prod
    groups (MSE codes plus QJL signs) also have qjl S float [size, size], signs uint8
    [kv_heads, n, ceil(size / 8)] and weights float [kv_heads, n], sqrt(pi/2)/size * gamma * scale.
    """

    channels: np.ndarray
    rotation: np.ndarray
    centroids: np.ndarray
    codes: np.ndarray
    scales: np.ndarray
    qjl: np.ndarray | None = None
    signs: np.ndarray | None = None
    weights: np.ndarray | None = None

    @property
    def part(self) -> Part:
        """The group as the kernels walk it."""
        bits = self.centroids.size.bit_length() - 1
        return Part(self.channels.shape[1], bits, self.qjl is not None)


@dataclass(frozen=True)
class StreamArrays:
    """A stream's tokens: ``quantized`` tokens in channel groups (at most two), then the exact
    tokens float [kv_heads, e, head_dim]."""

    groups: tuple[GroupArrays, ...]
    quantized: int
    exact: np.ndarray

    @property
    def length(self) -> int:
        return self.quantized + self.exact.shape[1]


class _Buffers:
    """Host arrays appended into one flat uint32 and one flat float32 buffer, with offsets."""

    def __init__(self) -> None:
        self.words: list[np.ndarray] = []
        self.floats: list[np.ndarray] = []
        self.word_count = 0
        self.float_count = 0

    def add_words(self, rows: np.ndarray, words_per_row: int) -> int:
        """Rows of bytes [..., k] as little-endian uint32 words, each row zero-padded to
        ``words_per_row`` words; returns the offset (in words)."""
        padded = np.zeros((*rows.shape[:-1], 4 * words_per_row), np.uint8)
        padded[..., : rows.shape[-1]] = rows
        at = self.word_count
        self.words.append(padded.reshape(-1).view("<u4").astype(np.uint32))
        self.word_count += self.words[-1].size
        return at

    def add_floats(self, values: np.ndarray) -> int:
        """``values`` as float32, flattened; returns the offset (in floats)."""
        at = self.float_count
        self.floats.append(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        self.float_count += self.floats[-1].size
        return at

    def upload(self) -> tuple[Any, Any]:
        """(words, floats) on the device; two spare zero words let a chunk of the last row read
        past its end."""
        words = np.concatenate([*self.words, np.zeros(2, np.uint32)])
        floats = np.concatenate([*self.floats, np.zeros(1, np.float32)])
        return cuda.to_device(words), cuda.to_device(floats)


def _add_stream(stream: StreamArrays, buffers: _Buffers, layout: list[int]) -> tuple[Part, ...]:
    """Append a stream's groups; layout gets LAYOUT_SLOTS offsets per group slot (zeros if unused)."""
    if len(stream.groups) > MAX_GROUPS:
        raise ValueError(f"a stream has at most {MAX_GROUPS} channel groups, got {len(stream.groups)}")
    parts = []
    for group in stream.groups:
        part = group.part
        slots = [buffers.add_words(group.codes, part.code_words), 0, buffers.add_floats(group.scales), 0]
        if part.prod:
            slots[1] = buffers.add_words(group.signs, part.sign_words)
            slots[3] = buffers.add_floats(group.weights)
        layout.extend(slots)
        parts.append(part)
    layout.extend([0] * LAYOUT_SLOTS * (MAX_GROUPS - len(parts)))
    return tuple(parts)


def _key_matrix(keys: StreamArrays, kv_heads: int, head_dim: int) -> np.ndarray:
    """[kv_heads, head_dim, Wk]: q @ matrix[h] = the rotated (and S-projected) queries."""
    parts = [group.part for group in keys.groups]
    matrix = np.zeros((kv_heads, head_dim, max(sum(part.width for part in parts), 1)), np.float32)
    column = 0
    for group, part in zip(keys.groups, parts, strict=True):
        for h in range(kv_heads):
            channels = group.channels[h]
            matrix[h, channels, column : column + part.size] = group.rotation.T
            if part.prod:
                matrix[h, channels, column + part.padded : column + part.padded + part.size] = group.qjl.T
        column += part.width
    return matrix


def _value_matrix(values: StreamArrays, kv_heads: int, head_dim: int) -> np.ndarray:
    """[kv_heads, Wv, head_dim]: rotated value sums @ matrix[h] = their channels' values."""
    parts = [group.part for group in values.groups]
    matrix = np.zeros((kv_heads, max(sum(part.width for part in parts), 1), head_dim), np.float32)
    column = 0
    for group, part in zip(values.groups, parts, strict=True):
        for h in range(kv_heads):
            channels = group.channels[h]
            rows = matrix[h]  # (matrix[h, slice, channels] would put the channel axis first)
            rows[column : column + part.size, channels] = group.rotation
            if part.prod:
                rows[column + part.padded : column + part.padded + part.size, channels] = group.qjl
        column += part.width
    return matrix


class DeviceStreams:
    """The keys and values of one layer on the GPU, in the kernels' layout (uploaded once, for
    repeated decode steps), and the scratch arrays of the last call (kept for the next).

    Attributes:
        kv_heads, head_dim: from the exact tokens' shape [kv_heads, e, head_dim].
        length: tokens (quantized and exact), the same in both streams.
        nbytes: device bytes held (packed streams, exact tokens, offsets, rotation matrices).
        read_nbytes: bytes one attention pass reads: codes, signs, per-token scales and weights,
            exact tokens (not the matrices and centroids, a few KiB per head).

    Raises:
        ValueError: streams of different lengths or head shapes, or more than two channel groups
            in a stream.
    """

    def __init__(self, keys: StreamArrays, values: StreamArrays) -> None:
        if keys.length != values.length or keys.exact.shape[::2] != values.exact.shape[::2]:
            raise ValueError(
                f"keys ({keys.length} tokens, exact {list(keys.exact.shape)}) and values "
                f"({values.length} tokens, exact {list(values.exact.shape)}) do not match"
            )
        self.kv_heads, _, self.head_dim = keys.exact.shape
        self.length = keys.length
        buffers = _Buffers()
        # centroids first: the kernel stages them from offset 0, keys' groups then values'
        for stream in (keys, values):
            for group in stream.groups:
                buffers.add_floats(group.centroids)
        layout = [self.length, keys.quantized, values.quantized]
        self._key_parts = _add_stream(keys, buffers, layout)
        self._value_parts = _add_stream(values, buffers, layout)
        centroid_floats = sum(1 << part.bits for part in (*self._key_parts, *self._value_parts))
        layout.append(buffers.add_floats(keys.exact))
        layout.append(buffers.add_floats(values.exact))
        self._exact_keys = self.length > keys.quantized
        self._exact_values = self.length > values.quantized
        self._words, self._floats = buffers.upload()
        self._layout = cuda.to_device(np.asarray(layout, np.int64))
        self._key_matrix = cuda.to_device(_key_matrix(keys, self.kv_heads, self.head_dim))
        self._value_matrix = cuda.to_device(_value_matrix(values, self.kv_heads, self.head_dim))
        self.nbytes = sum(
            int(array.nbytes)
            for array in (self._words, self._floats, self._layout, self._key_matrix, self._value_matrix)
        )
        self.read_nbytes = 4 * (buffers.word_count + buffers.float_count - centroid_floats)
        self._workspace: tuple[tuple[int, int], tuple[Any, Any, Any]] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"length={self.length}, nbytes={self.nbytes})"
        )

    def _spec(self, m: int, split_tokens: int | None) -> Spec:
        """The attend kernel's constants for m queries per KV head (see plan)."""
        return plan(
            self.head_dim,
            self._key_parts,
            self._value_parts,
            self._exact_keys,
            self._exact_values,
            tokens=self.length,
            kv_heads=self.kv_heads,
            queries=m,
            split_tokens=split_tokens,
        )

    def _scratch(self, m: int, spec: Spec) -> tuple[Any, Any, Any]:
        """Projected queries, partial sums and statistics for m queries (kept for the next call)."""
        splits = -(-self.length // spec.split)
        if self._workspace is None or self._workspace[0] != (m, spec.split):
            self._workspace = (
                (m, spec.split),
                (
                    cuda.device_array((self.kv_heads, m, spec.query_width), np.float32),
                    cuda.device_array((self.kv_heads, m, splits, max(spec.partial_width, 1)), np.float32),
                    cuda.device_array((self.kv_heads, m, splits, 2), np.float32),
                ),
            )
        return self._workspace[1]


def attention(queries: Any, streams: DeviceStreams, scale: float, split_tokens: int | None = None) -> Any:
    """softmax(scale * q K^T) V for every query, on the GPU, from the uploaded streams.

    Args:
        queries: float [q_heads, n_queries, streams.head_dim] with q_heads a multiple of
            streams.kv_heads (the caller checks the shape, and host queries for NaN and inf):
            a NumPy array (any float dtype), or a float32 GPU array (used in place); query head h
            attends with KV head h // (q_heads // kv_heads), every query to every token (no
            causal mask).
        streams: the layer's :class:`DeviceStreams`.
        scale: softmax scale of the logits q . k, e.g. 1 / sqrt(head_dim).
        split_tokens: tokens per block (default: from the length and the GPU's size).

    Returns:
        float32 [q_heads, n_queries, head_dim]: NumPy for NumPy queries, else a Numba device
        array (ready on the default stream).

    Raises:
        TypeError: non-float queries (or GPU queries that are not float32).
        ValueError: a bad split, too many queries.
    """
    on_device = is_gpu_array(queries)
    device_queries = to_device_floats(queries, "queries")
    q_heads, n_queries, dim = device_queries.shape
    m = q_heads // streams.kv_heads * n_queries
    spec = streams._spec(m, split_tokens)
    qp, partial, stats = streams._scratch(m, spec)
    out = cuda.device_array((q_heads, n_queries, dim), np.float32)
    heads = streams.kv_heads
    project[(m, heads), THREADS](device_queries, streams._key_matrix, spec.key_width, np.float32(scale), qp)
    splits, tiles = partial.shape[2], -(-m // spec.queries)
    attend_kernel(spec)[(splits, heads, tiles), THREADS](
        qp, streams._words, streams._floats, streams._layout, m, partial, stats
    )
    combine_kernel(dim, spec.value_width, spec.exact_values)[(m, heads), THREADS](
        partial, stats, streams._value_matrix, out
    )
    return results(on_device, out)

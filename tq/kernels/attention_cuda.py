"""Decode attention from the packed cache on an NVIDIA GPU (numba.cuda): the CUDA path of
:func:`tq.cache.attention.decode_attention`, with the same semantics (see that module's docstring).

    device_cache = DeviceKVCache(cache)      # upload the packed streams once
    out = decode_attention_cuda(queries, device_cache, scale)

Shapes and units. ``queries`` float [q_heads, n_queries, head_dim] (NumPy, or a float32 GPU
array); query head h attends with KV head h // (q_heads // kv_heads); the result is float32
[q_heads, n_queries, head_dim], a NumPy array for NumPy queries and a Numba device array for GPU
queries. Per KV head the kernels work on m = (q_heads // kv_heads) * n_queries queries.

What is uploaded (:class:`DeviceKVCache`). Each channel group's codes and Prod sign bits are
stored as little-endian uint32 words, each token's row padded to whole words (no padding at all
for head_dim 128), all groups in one flat word buffer; the per-token scales (the norms, with
``renormalize`` folded in), the Prod weights sqrt(pi/2)/size * gamma * scale, the exact tokens
and the centroids in one flat float32 buffer; their offsets in a small int64 array (so a launch
passes a handful of arrays: Numba's launch cost grows with every argument). Per KV head, a key
matrix [head_dim, Wk] maps a query to its rotated coordinates of every key group (Pi^T and, for
Prod, S^T, scattered from the group's channels: q[:, channels] @ Pi^T = q @ M) and a value matrix
[Wv, head_dim] maps rotated value sums back (Pi, and S for Prod, into the group's channels).

Three kernels per call (flash-decoding, split-K over tokens):

1. project: qp[h, i] = scale * q @ [key matrix | I] (the softmax scale folded in) -> [H, m, Wq].
2. attend, grid (token splits, KV heads, query tiles): a block takes ``split`` tokens of one
   KV head and up to QT queries. Scores: a token's row is shared by G threads, each owning
   chunks of 8 coordinates (the chunk's b bytes: one uint32 load at 4 bits; the G threads of a
   token read adjacent words, so a warp's loads together use every byte of the sectors they
   fetch, each byte once); a thread keeps its coordinates of the
   rotated queries in registers, looks the codes up in the centroid table in shared memory and
   adds q_j * c[idx_j] (and +-(S q)_j for Prod) for all QT queries; the G partial sums of a token
   meet in shared memory (Numba's simulator has no warp shuffles). Exact tokens are scored the
   same way from float32 rows. Then the split's softmax: max and sum of exp(score - max) per
   query. Values: the same thread layout accumulates p_t * scale_t * c[idx] (and the Prod sign
   sums) in the rotated domain in registers, over every token of the split; the threads of
   different tokens are summed through shared memory, 32 registers at a time; out: per (query, split)
   the rotated sums [Wv (+ head_dim for exact values)], the max and the sum.
3. combine, per (KV head, query): rescale the splits by exp(max_s - max), add them, one
   product with the value matrix (inverse rotations and scatter into channels), add the exact
   tokens' sums, divide by the softmax sum.

Every packed byte is read once per query tile (QT queries share a pass; m > QT reads the cache
m / QT times), with coalesced loads; the partial sums add 4 * (Wv [+ head_dim]) bytes per
(split, query), about 1% of the bytes read at 4 bits with the default split. Index arithmetic is
unsigned, as in :mod:`tq.kernels.cuda`. Accumulation is float32.

Measured: correctness on Numba's CUDA simulator against the float64 oracle
(tests/test_attention_cuda.py). Not measured here: speed on a GPU (benchmarks/attention_gpu.py
times it against torch fp16 attention on the reconstructed cache; run scripts/gpu-check.sh on a
GPU). The design aims at memory bandwidth (about 136 bytes per token and KV head at 4-bit
head_dim 128, against 512 for fp16 keys and values); the centroid look-ups (one shared-memory
load per coordinate) are the likely next limit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import cuda, float32, uint64

from tq.cache.packed_view import PackedCache, check_host_queries, check_query_shape, check_scale, packed_cache
from tq.core.packing import code_bytes
from tq.kernels import is_gpu_array
from tq.kernels.cuda import THREADS, U, _floats, _pow2_ceil, _pow2_floor, _results, simulated
from tq.kernels.naive import qjl_scale
from tq.quant.turboquant import TurboQuantProd

__all__ = ["DeviceKVCache", "decode_attention_cuda"]

_CHUNK = 8  # coordinates per chunk: 8 codes are b whole bytes
_REGISTERS = 64  # floats of query (or accumulator) registers per thread and part
_MAX_CHUNKS_PER_THREAD = 4
_TILE_TOKENS = 32  # tokens per scores tile, at least one per thread row
_REDUCE_SLICE = 32  # value registers per thread summed over the rows at once (16 KiB of shared)
_MAX_QUERY_TILE = 8
_SHARED_FLOATS = 11 * 1024  # 44 KiB of shared memory per block
_MAX_SPLIT = 2048  # tokens per block times QT
_MIN_SPLIT = 32
_BLOCKS_PER_SM = 32  # the default split aims at this many blocks per multiprocessor
_MAX_GRID_Z = 65535
_SLOTS = 4  # layout entries per quantized part: codes, signs, scales, weights offsets
_MAX_GROUPS = 2  # channel groups per stream (tq.cache.kvcache.split_widths)


# ---------------------------------------------------------------------------------------------
# What the kernels walk: quantized channel groups and exact tokens ("parts" of a stream)


@dataclass(frozen=True)
class _Part:
    """A channel group (bits 1..8; prod: MSE codes plus QJL signs) or the exact tokens (bits 0)."""

    size: int
    bits: int
    prod: bool = False

    @property
    def chunks(self) -> int:
        return -(-self.size // _CHUNK)

    @property
    def padded(self) -> int:
        return self.chunks * _CHUNK

    @property
    def width(self) -> int:
        """Columns in the rotated query / value-sum layout: the padded coordinates (twice for Prod)."""
        return self.padded * (2 if self.prod else 1)

    @property
    def code_words(self) -> int:
        return -(-code_bytes(self.size, self.bits) // 4)

    @property
    def sign_words(self) -> int:
        return -(-self.size // 32)


@dataclass(frozen=True)
class _Geometry:
    """How a part's rows map onto a block: ``group`` threads per token (a power of two), each
    owning chunks g + group * s (s < ``per_thread``); ``rows`` = THREADS / group tokens at once;
    a scores tile is ``tile`` = rows * unroll tokens."""

    group: int
    per_thread: int
    rows: int
    unroll: int

    @property
    def tile(self) -> int:
        return self.rows * self.unroll


def _geometry(part: _Part, queries: int) -> _Geometry:
    factor = 2 if part.prod else 1
    per_thread = max(1, min(_MAX_CHUNKS_PER_THREAD, _REGISTERS // (_CHUNK * queries * factor)))
    group = min(THREADS, _pow2_ceil(-(-part.chunks // per_thread)))
    per_thread = -(-part.chunks // group)
    rows = THREADS // group
    return _Geometry(group, per_thread, rows, max(1, _TILE_TOKENS // rows))


def _scratch_floats(parts: list[_Part], queries: int) -> int:
    """Shared floats the parts need: scores partials, value tree reduction, softmax statistics."""
    need = 2 * queries * THREADS
    for part in parts:
        geo = _geometry(part, queries)
        need = max(need, queries * geo.tile * (geo.group + 1))
        registers = queries * geo.per_thread * _CHUNK * (2 if part.prod else 1)
        need = max(need, min(registers, _REDUCE_SLICE) * THREADS)
    return need


@dataclass(frozen=True)
class _Spec:
    """Everything the attend kernel is compiled for (token counts and offsets are runtime)."""

    dim: int
    keys: tuple[_Part, ...]
    values: tuple[_Part, ...]
    exact_keys: bool
    exact_values: bool
    queries: int  # QT
    split: int  # tokens per block

    @property
    def exact(self) -> _Part:
        return _Part(self.dim, 0)

    @property
    def key_width(self) -> int:
        return sum(part.width for part in self.keys)

    @property
    def value_width(self) -> int:
        return sum(part.width for part in self.values)

    @property
    def query_width(self) -> int:
        return self.key_width + self.exact.padded

    @property
    def partial_width(self) -> int:
        return self.value_width + (self.exact.padded if self.exact_values else 0)

    @property
    def levels(self) -> int:
        return sum(1 << part.bits for part in (*self.keys, *self.values))

    def shared_floats(self) -> int:
        parts = [*self.keys, *self.values, self.exact]
        qt = self.queries
        return qt * (self.query_width + self.split) + self.levels + _scratch_floats(parts, qt)


# ---------------------------------------------------------------------------------------------
# Device functions per part


@functools.cache
def _chunk_loader(bits: int) -> Callable:
    """load(words, base, c) -> uint64 whose low 8b bits are the codes of chunk c of the row at
    word ``base`` (the chunk's b bytes start at byte c * b; 1, 2 or 3 words)."""
    words_needed = 1 if bits in (1, 2, 4) else 3 if bits == 7 else 2
    b = U(bits)

    @cuda.jit(device=True)
    def load(words, base, c):
        byte = c * b
        w = base + (byte >> U(2))
        s = (byte & U(3)) << U(3)
        if words_needed == 1:
            return uint64(words[w]) >> s
        x = (uint64(words[w]) | (uint64(words[w + U(1)]) << U(32))) >> s
        if words_needed == 3 and s > U(8):
            x |= uint64(words[w + U(2)]) << (U(64) - s)
        return x

    return load


@functools.cache
def _scores_function(
    part: _Part, qt: int, levels_at: int, column: int, query_width: int, split: int, first: bool
) -> Callable:
    """scores(t, h, n_rows, base, begin, end, t0, qp_s, cent_s, score_s, scratch, words, floats,
    codes_at, signs_at, scales_at, weights_at): the part's scores of tokens [begin, end) into
    score_s[q, token - t0] (stored if ``first``, else added); the token's row in the part's
    arrays is h * n_rows + token - base. Rotated queries at qp_s[q, column:]; centroids at
    cent_s[levels_at:]; exact rows (bits 0) are floats[codes_at + row * size:]."""
    geo = _geometry(part, qt)
    group, rows, tile, per = U(geo.group), U(geo.rows), U(geo.tile), U(geo.per_thread)
    unroll, gp = U(geo.unroll), U(geo.group + 1)
    exact, prod = part.bits == 0, part.prod
    chunks, size, padded, row_words = U(part.chunks), U(part.size), U(part.padded), U(part.code_words)
    sign_words, bits, mask = U(part.sign_words), U(part.bits), U((1 << part.bits) - 1)
    registers = qt * geo.per_thread * _CHUNK
    load = _chunk_loader(max(part.bits, 1))
    queries, width, col, cent, length = U(qt), U(query_width), U(column), U(levels_at), U(split)
    eight, one, threads = U(_CHUNK), U(1), U(THREADS)
    every_size = part.size % _CHUNK == 0

    @cuda.jit(device=True)
    def scores(t, h, n_rows, base, begin, end, t0, qp_s, cent_s, score_s, scratch, words, floats,
               codes_at, signs_at, scales_at, weights_at):  # fmt: skip
        g = t % group
        lane = t // group
        qr = cuda.local.array(registers, float32)
        qs = cuda.local.array(registers if prod else 1, float32)
        for q in range(queries):
            for s in range(per):
                c = g + group * s
                for k in range(eight):
                    i = (q * per + s) * eight + k
                    value = float32(0)
                    projected = float32(0)
                    if c < chunks:
                        value = qp_s[q * width + col + c * eight + k]
                        if prod:
                            projected = qp_s[q * width + col + padded + c * eight + k]
                    qr[i] = value
                    if prod:
                        qs[i] = projected
        acc = cuda.local.array(qt, float32)
        acc_s = cuda.local.array(qt, float32)
        for first_token in range(begin, end, tile):
            for u in range(unroll):
                slot = lane + rows * u
                token = first_token + slot
                for q in range(queries):
                    acc[q] = 0
                    acc_s[q] = 0
                scale = float32(0)
                weight = float32(0)
                if token < end:
                    row = h * n_rows + token - base
                    if exact:
                        scale = float32(1)
                        for s in range(per):
                            c = g + group * s
                            if c < chunks:
                                for k in range(eight):
                                    j = c * eight + k
                                    if every_size or j < size:
                                        value = floats[codes_at + row * size + j]
                                        for q in range(queries):
                                            acc[q] += qr[(q * per + s) * eight + k] * value
                    else:
                        scale = floats[scales_at + row]
                        for s in range(per):
                            c = g + group * s
                            if c < chunks:
                                x = load(words, codes_at + row * row_words, c)
                                for k in range(eight):
                                    centroid = cent_s[cent + ((x >> (bits * k)) & mask)]
                                    for q in range(queries):
                                        acc[q] += qr[(q * per + s) * eight + k] * centroid
                                if prod:
                                    sign_word = words[signs_at + row * sign_words + (c >> U(2))]
                                    sign_bits = uint64(sign_word) >> ((c & U(3)) << U(3))
                                    for k in range(eight):
                                        sign = float32(1) if (sign_bits >> k) & one else float32(-1)
                                        for q in range(queries):
                                            acc_s[q] += qs[(q * per + s) * eight + k] * sign
                        if prod:
                            weight = floats[weights_at + row]
                for q in range(queries):
                    scratch[(q * tile + slot) * gp + g] = acc[q] * scale + acc_s[q] * weight
            cuda.syncthreads()
            for i in range(t, queries * tile, threads):
                token = first_token + i % tile
                if token < end:
                    total = float32(0)
                    for gg in range(group):
                        total += scratch[i * gp + gg]
                    index = (i // tile) * length + token - t0
                    if first:
                        score_s[index] = total
                    else:
                        score_s[index] += total
            cuda.syncthreads()

    return scores


@functools.cache
def _values_function(part: _Part, qt: int, levels_at: int, column: int, split: int) -> Callable:
    """values(t, h, n_rows, base, begin, end, t0, cent_s, score_s, scratch, words, floats,
    codes_at, signs_at, scales_at, weights_at, partial, q0, m, split): sum_t p[q, t] * value_t
    over tokens [begin, end) in the part's rotated domain (exact tokens: their channels) ->
    partial[h, q0 + q, split, column:column + width]; score_s holds p = exp(score - max)."""
    geo = _geometry(part, qt)
    group, rows, per = U(geo.group), U(geo.rows), U(geo.per_thread)
    exact, prod = part.bits == 0, part.prod
    chunks, size, padded, row_words = U(part.chunks), U(part.size), U(part.padded), U(part.code_words)
    sign_words, bits, mask = U(part.sign_words), U(part.bits), U((1 << part.bits) - 1)
    per_query = geo.per_thread * _CHUNK
    registers = qt * per_query * (2 if prod else 1)
    load = _chunk_loader(max(part.bits, 1))
    queries, col, cent, length = U(qt), U(column), U(levels_at), U(split)
    count, half_registers = U(registers), U(qt * per_query)
    piece, threads = U(min(registers, _REDUCE_SLICE)), U(THREADS)
    eight, one, zero = U(_CHUNK), U(1), U(0)
    every_size = part.size % _CHUNK == 0

    @cuda.jit(device=True)
    def values(t, h, n_rows, base, begin, end, t0, cent_s, score_s, scratch, words, floats,
               codes_at, signs_at, scales_at, weights_at, partial, q0, m, split_index):  # fmt: skip
        g = t % group
        lane = t // group
        acc = cuda.local.array(registers, float32)
        w = cuda.local.array(qt, float32)
        w_s = cuda.local.array(qt, float32)
        for i in range(count):
            acc[i] = 0
        for token in range(begin + lane, end, rows):
            row = h * n_rows + token - base
            scale = float32(1) if exact else floats[scales_at + row]
            weight = floats[weights_at + row] if prod else float32(0)
            for q in range(queries):
                p = score_s[q * length + token - t0]
                w[q] = p * scale
                w_s[q] = p * weight
            for s in range(per):
                c = g + group * s
                if c < chunks:
                    if exact:
                        for k in range(eight):
                            j = c * eight + k
                            if every_size or j < size:
                                value = floats[codes_at + row * size + j]
                                for q in range(queries):
                                    acc[(q * per + s) * eight + k] += w[q] * value
                    else:
                        x = load(words, codes_at + row * row_words, c)
                        for k in range(eight):
                            centroid = cent_s[cent + ((x >> (bits * k)) & mask)]
                            for q in range(queries):
                                acc[(q * per + s) * eight + k] += w[q] * centroid
                        if prod:
                            sign_word = words[signs_at + row * sign_words + (c >> U(2))]
                            sign_bits = uint64(sign_word) >> ((c & U(3)) << U(3))
                            for k in range(eight):
                                sign = float32(1) if (sign_bits >> k) & one else float32(-1)
                                for q in range(queries):
                                    acc[half_registers + (q * per + s) * eight + k] += w_s[q] * sign
        # the rows (threads of different tokens) meet in shared memory, a slice of registers at a time
        for first in range(zero, count, piece):
            for i in range(piece):
                if first + i < count:
                    scratch[i * threads + t] = acc[first + i]
            cuda.syncthreads()
            for e in range(t, piece * group, threads):
                register = first + e // group
                column_g = e % group
                if register < count:
                    total = float32(0)
                    for r in range(rows):
                        total += scratch[(e // group) * threads + r * group + column_g]
                    signs_half = register >= half_registers
                    index = register - half_registers if signs_half else register
                    q = index // (per * eight)
                    c = column_g + group * ((index // eight) % per)
                    if c < chunks and q0 + q < m:
                        column = col + c * eight + index % eight
                        if signs_half:
                            column += padded
                        partial[h, q0 + q, split_index, column] = total
            cuda.syncthreads()

    return values


@functools.cache
def _reduce_function(qt: int, maximum: bool) -> Callable:
    """reduce(scratch, t, at): scratch[at + q * THREADS] = the max (or sum) of scratch[at + q *
    THREADS + j] over j < THREADS, for q < qt, in two rounds of 8 and 16; syncs before and after."""
    queries, threads, eight, sixteen, one = U(qt), U(THREADS), U(8), U(16), U(1)
    assert THREADS == 8 * 16

    @cuda.jit(device=True)
    def reduce(scratch, t, at):
        cuda.syncthreads()
        for e in range(t, queries * sixteen, threads):
            base = at + (e // sixteen) * threads + (e % sixteen) * eight
            value = scratch[base]
            for j in range(one, eight):
                value = max(value, scratch[base + j]) if maximum else value + scratch[base + j]
            scratch[base] = value
        cuda.syncthreads()
        if t < queries:
            base = at + t * threads
            value = scratch[base]
            for j in range(one, sixteen):
                other = scratch[base + j * eight]
                value = max(value, other) if maximum else value + other
            scratch[base] = value
        cuda.syncthreads()

    return reduce


# ---------------------------------------------------------------------------------------------
# Kernels


@cuda.jit
def _project(queries, matrix, key_width, scale, out):
    """out[h, i, c] = scale * (q @ matrix[h])[c] for c < key_width, then scale * q zero-padded;
    query i of KV head h is queries[h * group + i // n_queries, i % n_queries]."""
    t = uint64(cuda.threadIdx.x)
    i = uint64(cuda.blockIdx.x)
    h = uint64(cuda.blockIdx.y)
    n_queries = uint64(queries.shape[1])
    dim = uint64(queries.shape[2])
    group = uint64(queries.shape[0]) // uint64(out.shape[0])
    head = h * group + i // n_queries
    query = i % n_queries
    wk = uint64(key_width)
    for c in range(t, uint64(out.shape[2]), U(THREADS)):
        total = float32(0)
        if c < wk:
            for j in range(dim):
                total += queries[head, query, j] * matrix[h, j, c]
        elif c - wk < dim:
            total = queries[head, query, c - wk]
        out[h, i, c] = total * scale


@functools.cache
def _attend_kernel(spec: _Spec) -> Callable:
    """attend[(splits, KV heads, query tiles), THREADS](qp, words, floats, layout, m, partial,
    stats): scores, the split's softmax statistics and value sums (see the module docstring)."""
    qt, split = spec.queries, spec.split
    levels = spec.levels
    exact = spec.exact
    key_functions, value_functions = [], []
    cent, column = 0, 0
    for index, part in enumerate(spec.keys):
        key_functions.append(_scores_function(part, qt, cent, column, spec.query_width, split, index == 0))
        cent += 1 << part.bits
        column += part.width
    exact_scores = _scores_function(exact, qt, 0, column, spec.query_width, split, True)
    column = 0
    for part in spec.values:
        value_functions.append(_values_function(part, qt, cent, column, split))
        cent += 1 << part.bits
        column += part.width
    exact_values = _values_function(exact, qt, 0, column, split)
    n_keys, n_values = len(spec.keys), len(spec.values)
    key0, key1 = (*key_functions, exact_scores, exact_scores)[:2]  # absent groups are never called
    value0, value1 = (*value_functions, exact_values, exact_values)[:2]
    has_exact_keys, has_exact_values = spec.exact_keys, spec.exact_values
    query_floats, score_floats = qt * spec.query_width, qt * split
    scratch_floats = _scratch_floats([*spec.keys, *spec.values, exact], qt)
    queries, length, width, threads = U(qt), U(split), U(spec.query_width), U(THREADS)
    n_levels, level_trips = U(levels), U(-(-levels // THREADS))
    query_trips = U(-(-query_floats // THREADS))
    reduce_max, reduce_sum = _reduce_function(qt, True), _reduce_function(qt, False)
    key_slot = 3  # layout: n, quantized keys, quantized values, then _SLOTS per group slot
    value_slot = key_slot + _SLOTS * _MAX_GROUPS
    exact_slot = value_slot + _SLOTS * _MAX_GROUPS

    @cuda.jit
    def attend(qp, words, floats, layout, n_queries, partial, stats):
        t = uint64(cuda.threadIdx.x)
        split_index = uint64(cuda.blockIdx.x)
        h = uint64(cuda.blockIdx.y)
        q0 = uint64(cuda.blockIdx.z) * queries
        m = uint64(n_queries)
        n, n_keys_q, n_values_q = uint64(layout[0]), uint64(layout[1]), uint64(layout[2])
        t0 = split_index * length
        t1 = min(n, t0 + length)
        qp_s = cuda.shared.array(query_floats, float32)
        score_s = cuda.shared.array(score_floats, float32)
        cent_s = cuda.shared.array(levels, float32)
        scratch = cuda.shared.array(scratch_floats, float32)
        for i in range(level_trips):
            e = t + threads * i
            if e < n_levels:
                cent_s[e] = floats[e]
        for i in range(query_trips):
            e = t + threads * i
            if e < U(query_floats):
                q = q0 + e // width
                qp_s[e] = qp[h, q, e % width] if q < m else float32(0)
        cuda.syncthreads()

        # scores of the split's tokens: quantized groups, then exact tokens
        key_end = min(t1, n_keys_q)
        for index in range(n_keys):  # at most two groups
            a = key_slot + _SLOTS * index
            codes_at, signs_at = uint64(layout[a]), uint64(layout[a + 1])
            scales_at, weights_at = uint64(layout[a + 2]), uint64(layout[a + 3])
            if index == 0:
                key0(t, h, n_keys_q, U(0), t0, key_end, t0, qp_s, cent_s, score_s, scratch, words, floats,
                     codes_at, signs_at, scales_at, weights_at)  # fmt: skip
            else:
                key1(t, h, n_keys_q, U(0), t0, key_end, t0, qp_s, cent_s, score_s, scratch, words, floats,
                     codes_at, signs_at, scales_at, weights_at)  # fmt: skip
        if has_exact_keys:
            exact_at = uint64(layout[exact_slot])
            exact_scores(t, h, n - n_keys_q, n_keys_q, max(t0, n_keys_q), t1, t0, qp_s, cent_s,
                         score_s, scratch, words, floats, exact_at, U(0), U(0), U(0))  # fmt: skip

        # the split's softmax: max and sum of exp(score - max) per query
        count = t1 - t0
        for q in range(queries):
            best = float32(-math.inf)
            for i in range(t, count, threads):
                best = max(best, score_s[q * length + i])
            scratch[q * threads + t] = best
        reduce_max(scratch, t, U(0))
        for q in range(queries):
            best = scratch[q * threads]
            total = float32(0)
            for i in range(t, count, threads):
                p = math.exp(score_s[q * length + i] - best)
                score_s[q * length + i] = p
                total += p
            scratch[(queries + q) * threads + t] = total
        reduce_sum(scratch, t, queries * threads)
        if t < queries and q0 + t < m:
            stats[h, q0 + t, split_index, 0] = scratch[t * threads]
            stats[h, q0 + t, split_index, 1] = scratch[(queries + t) * threads]
        cuda.syncthreads()

        # value sums: quantized groups (rotated domain), then exact tokens (channels)
        value_end = min(t1, n_values_q)
        for index in range(n_values):
            a = value_slot + _SLOTS * index
            codes_at, signs_at = uint64(layout[a]), uint64(layout[a + 1])
            scales_at, weights_at = uint64(layout[a + 2]), uint64(layout[a + 3])
            if index == 0:
                value0(t, h, n_values_q, U(0), t0, value_end, t0, cent_s, score_s, scratch, words, floats,
                       codes_at, signs_at, scales_at, weights_at, partial, q0, m, split_index)  # fmt: skip
            else:
                value1(t, h, n_values_q, U(0), t0, value_end, t0, cent_s, score_s, scratch, words, floats,
                       codes_at, signs_at, scales_at, weights_at, partial, q0, m, split_index)  # fmt: skip
        if has_exact_values:
            exact_at = uint64(layout[exact_slot + 1])
            exact_values(t, h, n - n_values_q, n_values_q, max(t0, n_values_q), t1, t0, cent_s,
                         score_s, scratch, words, floats, exact_at, U(0), U(0), U(0), partial, q0,
                         m, split_index)  # fmt: skip

    return attend


@functools.cache
def _combine_kernel(dim: int, value_width: int, exact_values: bool) -> Callable:
    """combine[(m, KV heads), THREADS](partial, stats, matrix, out): merge the splits of one
    (KV head, query) and rotate back: out = (sums @ matrix[h] + exact sums) / softmax sum."""
    partial_width = value_width + (-(-dim // _CHUNK) * _CHUNK if exact_values else 0)
    d, wv, pw, threads = U(dim), U(value_width), U(partial_width), U(THREADS)
    sums_floats = max(partial_width, 1)  # a shared array's size must be a compile-time constant

    @cuda.jit
    def combine(partial, stats, matrix, out):
        t = uint64(cuda.threadIdx.x)
        i = uint64(cuda.blockIdx.x)
        h = uint64(cuda.blockIdx.y)
        splits = uint64(partial.shape[2])
        sums = cuda.shared.array(sums_floats, float32)
        best = float32(-math.inf)
        for s in range(splits):
            best = max(best, stats[h, i, s, 0])
        total = float32(0)
        for s in range(splits):
            total += stats[h, i, s, 1] * math.exp(stats[h, i, s, 0] - best)
        for k in range(t, pw, threads):
            value = float32(0)
            for s in range(splits):
                value += partial[h, i, s, k] * math.exp(stats[h, i, s, 0] - best)
            sums[k] = value
        cuda.syncthreads()
        n_queries = uint64(out.shape[1])
        head = h * (uint64(out.shape[0]) // uint64(partial.shape[0])) + i // n_queries
        for c in range(t, d, threads):
            value = float32(0)
            for k in range(wv):
                value += sums[k] * matrix[h, k, c]
            if exact_values:
                value += sums[wv + c]
            out[head, i % n_queries, c] = value / total

    return combine


# ---------------------------------------------------------------------------------------------
# The device cache


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


class DeviceKVCache:
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

    def __init__(self, cache: Any) -> None:
        view = cache if isinstance(cache, PackedCache) else packed_cache(cache)
        keys, values = view.keys, view.values
        self.kv_heads, self.head_dim, self.length = view.kv_heads, view.head_dim, view.length
        buffers = _Buffers()
        # centroids first: the kernel stages them from offset 0, keys' groups then values'
        for stream in (keys, values):
            for group in stream.groups:
                buffers.add_floats(group.quantizer.codebook.centroids)
        layout = [self.length, keys.quantized, values.quantized]
        self._key_parts = self._add_stream(keys, buffers, layout)
        self._value_parts = self._add_stream(values, buffers, layout)
        centroid_floats = sum(1 << part.bits for part in (*self._key_parts, *self._value_parts))
        layout.append(buffers.add_floats(keys.exact))
        layout.append(buffers.add_floats(values.exact))
        self._exact_keys = self.length > keys.quantized
        self._exact_values = self.length > values.quantized
        self._words, self._floats = buffers.upload()
        self._layout = cuda.to_device(np.asarray(layout, np.int64))
        self._key_matrix = cuda.to_device(self._key_matrix_of(keys))
        self._value_matrix = cuda.to_device(self._value_matrix_of(values))
        self.nbytes = sum(
            int(array.nbytes)
            for array in (self._words, self._floats, self._layout, self._key_matrix, self._value_matrix)
        )
        self.read_nbytes = 4 * (buffers.word_count + buffers.float_count - centroid_floats)
        self._workspace: tuple[tuple[int, int], tuple[Any, Any, Any]] | None = None

    def __repr__(self) -> str:
        return (
            f"DeviceKVCache(kv_heads={self.kv_heads}, head_dim={self.head_dim}, length={self.length}, "
            f"nbytes={self.nbytes})"
        )

    @staticmethod
    def _add_stream(stream: Any, buffers: _Buffers, layout: list[int]) -> tuple[_Part, ...]:
        """Append a stream's groups; layout gets _SLOTS offsets per group slot (zeros if unused)."""
        parts = []
        for group in stream.groups:
            quantizer = group.quantizer
            prod = isinstance(quantizer, TurboQuantProd)
            part = _Part(group.channels.shape[1], quantizer.codebook.bits, prod)
            slots = [buffers.add_words(group.codes, part.code_words), 0, buffers.add_floats(group.scales), 0]
            if prod:
                slots[1] = buffers.add_words(group.signs, part.sign_words)
                weights = qjl_scale(part.size) * group.gammas.astype(np.float64) * group.scales
                slots[3] = buffers.add_floats(weights)
            layout.extend(slots)
            parts.append(part)
        layout.extend([0] * _SLOTS * (_MAX_GROUPS - len(parts)))
        return tuple(parts)

    def _key_matrix_of(self, keys: Any) -> np.ndarray:
        """[kv_heads, head_dim, Wk]: q @ matrix[h] = the rotated (and S-projected) queries."""
        width = sum(part.width for part in self._key_parts)
        matrix = np.zeros((self.kv_heads, self.head_dim, max(width, 1)), np.float32)
        column = 0
        for group, part in zip(keys.groups, self._key_parts, strict=True):
            quantizer = group.quantizer
            for h in range(self.kv_heads):
                channels = group.channels[h]
                matrix[h, channels, column : column + part.size] = quantizer.rotation.matrix.T
                if part.prod:
                    matrix[h, channels, column + part.padded : column + part.padded + part.size] = (
                        quantizer.qjl.T
                    )
            column += part.width
        return matrix

    def _value_matrix_of(self, values: Any) -> np.ndarray:
        """[kv_heads, Wv, head_dim]: rotated value sums @ matrix[h] = their channels' values."""
        width = sum(part.width for part in self._value_parts)
        matrix = np.zeros((self.kv_heads, max(width, 1), self.head_dim), np.float32)
        column = 0
        for group, part in zip(values.groups, self._value_parts, strict=True):
            quantizer = group.quantizer
            for h in range(self.kv_heads):
                channels = group.channels[h]
                rows = matrix[h]  # (matrix[h, slice, channels] would put the channel axis first)
                rows[column : column + part.size, channels] = quantizer.rotation.matrix
                if part.prod:
                    rows[column + part.padded : column + part.padded + part.size, channels] = quantizer.qjl
            column += part.width
        return matrix

    def _spec(self, m: int, split_tokens: int | None) -> _Spec:
        """The attend kernel's constants for m queries per KV head: the query tile (the largest
        power of two <= 8 that fits the shared memory) and the split length."""
        tile = min(_MAX_QUERY_TILE, _pow2_ceil(m))
        while True:
            limit = max(_MAX_SPLIT // tile, _MIN_SPLIT)
            if split_tokens is not None:
                if not 1 <= split_tokens <= limit:
                    raise ValueError(f"split_tokens must be in [1, {limit}] here, got {split_tokens}")
                split = split_tokens
            else:
                blocks = self.length * self.kv_heads * -(-m // tile)
                per_split = _pow2_floor(max(1, blocks // (_BLOCKS_PER_SM * _multiprocessors())))
                split = min(max(per_split, _MIN_SPLIT), limit)
            spec = _Spec(
                self.head_dim,
                self._key_parts,
                self._value_parts,
                self._exact_keys,
                self._exact_values,
                tile,
                split,
            )
            if spec.shared_floats() <= _SHARED_FLOATS:
                return spec
            if tile == 1:
                raise ValueError(
                    f"head_dim {self.head_dim} needs more shared memory than a block has "
                    f"({4 * spec.shared_floats()} > {4 * _SHARED_FLOATS} bytes)"
                )
            tile //= 2

    def _buffers(self, m: int, spec: _Spec) -> tuple[Any, Any, Any]:
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


@functools.cache
def _multiprocessors() -> int:
    """The GPU's multiprocessor count (1 on the simulator, which has no device to ask)."""
    return 1 if simulated() else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


# ---------------------------------------------------------------------------------------------
# The entry point


def _check(queries: Any, cache: DeviceKVCache, scale: float) -> tuple[Any, bool, float]:
    """Validate the arguments -> (float32 device queries, whether they came on the device, scale)."""
    if not isinstance(cache, DeviceKVCache):
        raise TypeError(
            f"cache must be a DeviceKVCache (DeviceKVCache(quantized_cache) uploads one), "
            f"got {type(cache).__name__}"
        )
    scale = check_scale(scale)
    on_device = is_gpu_array(queries)
    if on_device:
        check_query_shape(tuple(queries.shape), cache.kv_heads, cache.head_dim)
    else:
        check_host_queries(queries, cache.kv_heads, cache.head_dim)
    return _floats(queries, "queries"), on_device, scale


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
    device_queries, on_device, scale = _check(queries, cache, scale)
    q_heads, n_queries, dim = device_queries.shape
    m = q_heads // cache.kv_heads * n_queries
    spec = cache._spec(m, split_tokens)
    tiles = -(-m // spec.queries)
    if tiles > _MAX_GRID_Z:
        raise ValueError(f"too many queries per KV head ({m}): at most {_MAX_GRID_Z * spec.queries}")
    qp, partial, stats = cache._buffers(m, spec)
    out = cuda.device_array((q_heads, n_queries, dim), np.float32)
    heads = cache.kv_heads
    _project[(m, heads), THREADS](device_queries, cache._key_matrix, spec.key_width, np.float32(scale), qp)
    splits = partial.shape[2]
    _attend_kernel(spec)[(splits, heads, tiles), THREADS](
        qp, cache._words, cache._floats, cache._layout, m, partial, stats
    )
    _combine_kernel(dim, spec.value_width, spec.exact_values)[(m, heads), THREADS](
        partial, stats, cache._value_matrix, out
    )
    return _results(on_device, out)

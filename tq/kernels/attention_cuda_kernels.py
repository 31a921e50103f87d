"""The numba.cuda kernels of the decode attention (:mod:`tq.kernels.attention_cuda`), compiled per
:class:`~tq.kernels.attention_cuda_plan.Spec`, and the device functions they call.

1. project: qp[h, i] = scale * q @ [key matrix | I] (the softmax scale folded in) -> [H, m, Wq].
2. attend, grid (token splits, KV heads, query tiles): a block takes ``split`` tokens of one
   KV head and up to QT queries. Scores, part by part (:func:`_scores_function`): a thread keeps
   its coordinates of the rotated queries in registers, looks the codes up in the centroid table
   in shared memory and adds q_j * c[idx_j] (and +-(S q)_j for Prod) for all QT queries; the G
   partial sums of a token meet in shared memory (Numba's simulator has no warp shuffles). Exact
   tokens are scored the same way from float32 rows. Then the split's softmax: max and sum of
   exp(score - max) per query. Values, part by part (:func:`_values_function`): the same thread
   layout accumulates p_t * scale_t * c[idx] (and the Prod sign sums) in the rotated domain in
   registers, over every token of the split; the threads of different tokens are summed through
   shared memory, 32 registers at a time; out: per (query, split) the rotated sums [Wv (+
   head_dim for exact values)], the max and the sum.
3. combine, per (KV head, query): rescale the splits by exp(max_s - max), add them, one
   product with the value matrix (inverse rotations and scatter into channels), add the exact
   tokens' sums, divide by the softmax sum.

A part's data are in ``words`` (uint32: codes and sign bits, each token's row padded to whole
words) and ``floats`` (float32: per-token scales and Prod weights, exact tokens), at the offsets
``codes_at``, ``signs_at``, ``scales_at``, ``weights_at``; a token's row in the part's arrays is
h * n_rows + token - base. The device functions live in this module, beside the kernel that calls
them: Numba's CUDA simulator swaps the ``cuda`` module in a function's module globals while it
runs, so a device function of another module would see the real module whenever another thread
left a device function of that module first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from numba import cuda, float32, uint64

from tq.kernels.attention_cuda_plan import (
    CHUNK,
    LAYOUT_SLOTS,
    MAX_GROUPS,
    REDUCE_SLICE,
    Part,
    Spec,
    part_geometry,
    scratch_floats,
)
from tq.kernels.cuda_device import THREADS, U

__all__ = ["attend_kernel", "combine_kernel", "project"]


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
    part: Part, qt: int, levels_at: int, column: int, query_width: int, split: int, first: bool
) -> Callable:
    """scores(t, h, n_rows, base, begin, end, t0, qp_s, cent_s, score_s, scratch, words, floats,
    codes_at, signs_at, scales_at, weights_at): the part's scores of tokens [begin, end) into
    score_s[q, token - t0] (stored if ``first``, else added); the token's row in the part's
    arrays is h * n_rows + token - base. Rotated queries at qp_s[q, column:]; centroids at
    cent_s[levels_at:]; exact rows (bits 0) are floats[codes_at + row * size:]."""
    geo = part_geometry(part, qt)
    group, rows, tile, per = U(geo.group), U(geo.rows), U(geo.tile), U(geo.per_thread)
    unroll, gp = U(geo.unroll), U(geo.group + 1)
    exact, prod = part.bits == 0, part.prod
    chunks, size, padded, row_words = U(part.chunks), U(part.size), U(part.padded), U(part.code_words)
    sign_words, bits, mask = U(part.sign_words), U(part.bits), U((1 << part.bits) - 1)
    registers = qt * geo.per_thread * CHUNK
    load = _chunk_loader(max(part.bits, 1))
    queries, width, col, cent, length = U(qt), U(query_width), U(column), U(levels_at), U(split)
    eight, one, threads = U(CHUNK), U(1), U(THREADS)
    every_size = part.size % CHUNK == 0

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
def _values_function(part: Part, qt: int, levels_at: int, column: int, split: int) -> Callable:
    """values(t, h, n_rows, base, begin, end, t0, cent_s, score_s, scratch, words, floats,
    codes_at, signs_at, scales_at, weights_at, partial, q0, m, split): sum_t p[q, t] * value_t
    over tokens [begin, end) in the part's rotated domain (exact tokens: their channels) ->
    partial[h, q0 + q, split, column:column + width]; score_s holds p = exp(score - max)."""
    geo = part_geometry(part, qt)
    group, rows, per = U(geo.group), U(geo.rows), U(geo.per_thread)
    exact, prod = part.bits == 0, part.prod
    chunks, size, padded, row_words = U(part.chunks), U(part.size), U(part.padded), U(part.code_words)
    sign_words, bits, mask = U(part.sign_words), U(part.bits), U((1 << part.bits) - 1)
    per_query = geo.per_thread * CHUNK
    registers = qt * per_query * (2 if prod else 1)
    load = _chunk_loader(max(part.bits, 1))
    queries, col, cent, length = U(qt), U(column), U(levels_at), U(split)
    count, half_registers = U(registers), U(qt * per_query)
    piece, threads = U(min(registers, REDUCE_SLICE)), U(THREADS)
    eight, one, zero = U(CHUNK), U(1), U(0)
    every_size = part.size % CHUNK == 0

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
def project(queries, matrix, key_width, scale, out):
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
def attend_kernel(spec: Spec) -> Callable:
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
    scratch_size = scratch_floats([*spec.keys, *spec.values, exact], qt)
    queries, length, width, threads = U(qt), U(split), U(spec.query_width), U(THREADS)
    n_levels, level_trips = U(levels), U(-(-levels // THREADS))
    query_trips = U(-(-query_floats // THREADS))
    reduce_max, reduce_sum = _reduce_function(qt, True), _reduce_function(qt, False)
    key_slot = 3  # layout: n, quantized keys, quantized values, then LAYOUT_SLOTS per group slot
    value_slot = key_slot + LAYOUT_SLOTS * MAX_GROUPS
    exact_slot = value_slot + LAYOUT_SLOTS * MAX_GROUPS

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
        scratch = cuda.shared.array(scratch_size, float32)
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
            a = key_slot + LAYOUT_SLOTS * index
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
            a = value_slot + LAYOUT_SLOTS * index
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
def combine_kernel(dim: int, value_width: int, exact_values: bool) -> Callable:
    """combine[(m, KV heads), THREADS](partial, stats, matrix, out): merge the splits of one
    (KV head, query) and rotate back: out = (sums @ matrix[h] + exact sums) / softmax sum."""
    partial_width = value_width + (Part(dim, 0).padded if exact_values else 0)
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

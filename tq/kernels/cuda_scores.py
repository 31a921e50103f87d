"""The numba.cuda scores kernel of the GPU backend (:mod:`tq.kernels.cuda`): estimates of <q, x>
straight from the packed codes, compiled once per (dimension, bit width, flags, query tile).

The queries arrive rotated (and projected by S for Prod) by :func:`tq.kernels.cuda_codec.transform_kernel`.
Each thread owns one stored vector and a tile of up to 8 queries (staged whole in shared memory),
reads its packed codes from stages of up to 128 bytes per vector loaded with coalesced loads,
decodes them with a bit reader, and sums (Pi q)_j * c[idx_j] (plus the sign terms) in float32
registers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from numba import cuda, float32, uint8, uint64

from tq.core.packing import code_bytes
from tq.kernels.cuda_device import THREADS, U, pow2_ceil, pow2_floor
from tq.kernels.naive import qjl_scale

__all__ = ["query_tile_size", "scores_kernel"]

_MAX_QUERY_TILE = 8  # queries per scores pass
_SHARED_BUDGET = 44 * 1024  # bytes of shared memory the scores kernel may stage
_QUERY_FLOATS = 2048  # staged query floats per scores pass (8 KiB; twice that for Prod)
_CODE_CHUNK = 32  # coordinates per scores chunk: 32 * b bits = 4 * b whole bytes


def query_tile_size(dim: int, m: int) -> int:
    """Queries per scores pass: up to 8, fewer for few queries or when [tile, d] passes 8 KiB."""
    padded = -(-dim // _CODE_CHUNK) * _CODE_CHUNK
    return max(1, min(_MAX_QUERY_TILE, pow2_ceil(m), pow2_floor(max(1, _QUERY_FLOATS // padded))))


@functools.cache
def scores_kernel(dim: int, bits: int, has_norms: bool, prod: bool, query_tile: int) -> Callable:
    """scores[(vector blocks, query blocks), THREADS](rotated, projected, codes, signs, norms, gammas,
    centroids, out): out[q, i] = s_i (<Pi q, c[idx_i]> + w_i <S q, sign_i>).

    One stored vector per thread. A pass takes ``query_tile`` queries (strided over the grid's y
    dimension), stages them [query_tile, d rounded up to 32] in shared memory, then walks the codes
    in stages of up to 128 bytes per vector, staged with coalesced loads, 32 coordinates (4b whole
    bytes) at a time."""
    levels = 1 << bits
    level_trips = U(-(-levels // THREADS))
    chunk_bytes = _CODE_CHUNK * bits // 8
    chunks = -(-dim // _CODE_CHUNK)
    query_bytes = (2 if prod else 1) * query_tile * chunks * _CODE_CHUNK * 4
    chunk_cost = THREADS * (chunk_bytes + (_CODE_CHUNK // 8 if prod else 0) + 2)  # staged bytes
    stage_chunks = max(1, min(chunks, 128 // chunk_bytes, (_SHARED_BUDGET - query_bytes) // chunk_cost))
    stage_bytes = stage_chunks * chunk_bytes
    stage_sign_bytes = stage_chunks * _CODE_CHUNK // 8
    code_stride = stage_bytes + 1  # odd strides: threads reading their own rows spread over banks
    sign_stride = stage_sign_bytes + 1
    code_size, sign_size = THREADS * code_stride, THREADS * sign_stride if prod else 1
    query_pitch = chunks * _CODE_CHUNK
    query_floats = query_tile * query_pitch
    projected_floats = query_floats if prod else 1
    query_trips = U(-(-query_floats // THREADS))
    n_levels, bit_count, mask, d = U(levels), U(bits), U(levels - 1), U(dim)
    n_bytes, sign_bytes = U(code_bytes(dim, bits)), U(code_bytes(dim, 1))
    chunk, chunk_byte_count = U(_CODE_CHUNK), U(chunk_bytes)
    stage_byte_count, stage_sign_count = U(stage_bytes), U(stage_sign_bytes)
    stage_coordinates, stage_chunk_count = U(stage_chunks * _CODE_CHUNK), U(stage_chunks)
    queries_per_pass, query_count, pitch = U(query_tile), U(query_floats), U(query_pitch)
    code_pitch, sign_pitch = U(code_stride), U(sign_stride)
    sign_weight = qjl_scale(dim)
    eight, one, zero, threads = U(8), U(1), U(0), U(THREADS)

    @cuda.jit
    def scores(rotated, projected, codes, signs, norms, gammas, centroids, out):
        t = uint64(cuda.threadIdx.x)
        v0 = uint64(cuda.blockIdx.x) * threads
        vector = v0 + t
        m = uint64(rotated.shape[0])
        n = uint64(codes.shape[0])
        query_s = cuda.shared.array(query_floats, float32)
        projected_s = cuda.shared.array(projected_floats, float32)
        code_s = cuda.shared.array(code_size, uint8)
        sign_s = cuda.shared.array(sign_size, uint8)
        centroid_s = cuda.shared.array(levels, float32)
        acc = cuda.local.array(query_tile, float32)
        acc_signs = cuda.local.array(query_tile, float32)
        for i in range(level_trips):
            e = t + threads * i
            if e < n_levels:
                centroid_s[e] = centroids[e]
        row_scale = float32(1)
        row_weight = float32(0)
        if vector < n:
            if has_norms:
                row_scale = norms[vector]
            if prod:
                row_weight = float32(sign_weight) * gammas[vector]

        first_query = uint64(cuda.blockIdx.y) * queries_per_pass
        for q0 in range(first_query, m, uint64(cuda.gridDim.y) * queries_per_pass):
            cuda.syncthreads()  # the previous pass is done with the queries
            for i in range(query_trips):  # [query_tile, pitch]; zero past d and past m
                e = t + threads * i
                if e < query_count:
                    q = q0 + e // pitch
                    j = e % pitch
                    value = float32(0)
                    projected_value = float32(0)
                    if q < m and j < d:
                        value = rotated[q, j]
                        if prod:
                            projected_value = projected[q, j]
                    query_s[e] = value
                    if prod:
                        projected_s[e] = projected_value
            for q in range(queries_per_pass):
                acc[q] = 0
                acc_signs[q] = 0
            for s0 in range(zero, d, stage_coordinates):
                cuda.syncthreads()  # the previous stage is used up (and the queries are in place)
                byte0 = (s0 >> U(3)) * bit_count
                for i in range(stage_byte_count):
                    e = t + threads * i
                    r = e // stage_byte_count
                    p = e % stage_byte_count
                    byte = uint8(0)
                    if v0 + r < n and byte0 + p < n_bytes:
                        byte = codes[v0 + r, byte0 + p]
                    code_s[r * code_pitch + p] = byte
                if prod:
                    for i in range(stage_sign_count):
                        e = t + threads * i
                        r = e // stage_sign_count
                        p = e % stage_sign_count
                        byte = uint8(0)
                        if v0 + r < n and (s0 >> U(3)) + p < sign_bytes:
                            byte = signs[v0 + r, (s0 >> U(3)) + p]
                        sign_s[r * sign_pitch + p] = byte
                cuda.syncthreads()
                for c in range(stage_chunk_count):
                    j0 = s0 + c * chunk
                    if j0 < d:
                        # a bit reader over the chunk's 4b bytes: no code straddling logic per position
                        position = t * code_pitch + c * chunk_byte_count
                        sign_position = t * sign_pitch + c * (chunk >> U(3))
                        held_bits = uint64(0)
                        held = zero
                        sign_bits = uint64(0)
                        jj = zero
                        while jj < chunk:  # coordinates past d meet zero query entries
                            if held < bit_count:
                                held_bits |= uint64(code_s[position]) << held
                                position += one
                                held += eight
                            centroid = centroid_s[held_bits & mask]
                            held_bits >>= bit_count
                            held -= bit_count
                            for q in range(queries_per_pass):
                                acc[q] += query_s[q * pitch + j0 + jj] * centroid
                            if prod:
                                if (jj & U(7)) == zero:
                                    sign_bits = uint64(sign_s[sign_position + (jj >> U(3))])
                                sign = float32(-1)
                                if sign_bits & one:
                                    sign = float32(1)
                                sign_bits >>= one
                                for q in range(queries_per_pass):
                                    acc_signs[q] += projected_s[q * pitch + j0 + jj] * sign
                            jj += one
            if vector < n:
                for q in range(queries_per_pass):
                    if q0 + q < m:
                        out[q0 + q, vector] = (acc[q] + row_weight * acc_signs[q]) * row_scale

    return scores

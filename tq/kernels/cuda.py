"""Numba CUDA kernels: the GPU backend, tested against :mod:`tq.kernels.naive`.

Same six functions, arguments and results as the reference (see its docstring for shapes, ties
and ``normalize``), plus :func:`available` and :func:`simulated`. Every array argument may be a
NumPy array or a GPU array (anything with ``__cuda_array_interface__``: Numba device arrays,
torch CUDA tensors, CuPy arrays), which is used in place. The results are NumPy arrays when the
primary input (``x`` for encode, ``codes`` for decode, ``queries`` for scores) is a NumPy array,
and Numba device arrays otherwise (``torch.as_tensor`` / ``cupy.asarray`` wrap them without a
copy). Host floats of any precision are converted to float32; GPU floats must be float32, codes
and signs uint8. Kernels run on Numba's default stream; a device result is ready for work queued
after it on that stream (or on torch's default stream, which is the same legacy stream).

Design. A block of 128 threads works on ``ROWS`` rows; each row belongs to ``G`` threads, each
holding ``E`` of its coordinates in registers (``G * E`` is d rounded up to a multiple of 8G;
the padding is zero). A thread holds either the strided coordinates g + G*m (coalesced loads and
stores) or the contiguous ones g*E + m (whole code bytes: E*b bits are whole bytes); the block's
one shared-memory tile [ROWS, G*E] switches between the two.

- encode (one kernel): load the strided coordinates, row norm in float64 (sum in registers, then
  across the row's threads), rotate, switch to contiguous, quantize by binary search over the cell
  edges in shared memory (the number of edges < value, so ties go to the lower cell), pack
  E*b/8 bytes per thread in the layout of :mod:`tq.core.packing`. Hadamard rotation: the Walsh-Hadamard
  butterflies of span >= G run in registers in the strided layout and those of span < G in the
  contiguous one, so the transform costs one pass through shared memory. Haar rotation: the tile
  is multiplied in place by the zero-padded Pi^T, each thread accumulating a register micro-tile
  (rows x strided columns) over k-tiles of the matrix staged in shared memory (read from global
  memory for d > 2048). Prod continues in the same kernel: the residual stays in the rotated
  domain, gamma is its norm, and S r = (S Pi^T) r_rot is a second in-place product whose signs are
  packed E/8 bytes per thread.
- decode: the reverse: unpack E codes per thread and look up centroids (times the norm), rotate
  back (butterflies, or the product with Pi), and for Prod add (w sign) @ S with
  w = sqrt(pi/2)/d * gamma * norm.
- scores: the queries are rotated once by the same tile machinery (and projected by S for Prod);
  then each thread owns one stored vector and a tile of up to 8 queries (staged whole in shared
  memory), reads its packed codes from stages of up to 128 bytes per vector loaded with coalesced
  loads, decodes them with a bit reader, and sums (Pi q)_j * c[idx_j] (plus the sign terms) in
  float32 registers.

All index arithmetic is unsigned (np.uint64 constants): Numba adds a negative-index check to every
signed index, and with signed indices these kernels were bound by integer instructions (measured
on an H200). Loops over E, over the bytes of a thread and over a k-tile have constant trip
counts, so they unroll and the register arrays stay in registers.

Per-quantizer constants (padded rotation matrices, Hadamard signs, S, S Pi^T, codebook edges and
centroids) are uploaded once and cached, keyed by the identity of the NumPy arrays they come from
(evicted when those arrays are freed; the arrays must not be modified in place).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np
from numba import cuda, float32, float64, uint8, uint64

from tq.core.codebook import Codebook
from tq.core.packing import code_bytes
from tq.core.rotation import Rotation
from tq.kernels import is_gpu_array
from tq.kernels.naive import qjl_scale

THREADS = 128  # threads per block, every kernel
_STAGED_FLOATS = 2048  # matrix rows staged per k-tile: at most this many floats (8 KiB)
_MAX_QUERY_TILE = 8  # queries per scores pass
_SHARED_BUDGET = 44 * 1024  # bytes of shared memory the scores kernel may stage
_QUERY_FLOATS = 2048  # staged query floats per scores pass (8 KiB; twice that for Prod)
_CODE_CHUNK = 32  # coordinates per scores chunk: 32 * b bits = 4 * b whole bytes
U = np.uint64  # kernel index constants are unsigned (see the module docstring)


def available() -> bool:
    """Whether numba.cuda can launch kernels here: a usable GPU, or the simulator."""
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver or toolkit install means no GPU backend
        return False


def simulated() -> bool:
    """Whether the kernels run on Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(numba.config.ENABLE_CUDASIM)


# ---------------------------------------------------------------------------------------------
# Geometry and the device functions shared by the kernels of one dimension.


def _pow2_floor(value: int) -> int:
    return 1 << (value.bit_length() - 1)


def _pow2_ceil(value: int) -> int:
    return 1 << (value - 1).bit_length()


@functools.cache
def _geometry(dim: int) -> SimpleNamespace:
    """How rows of ``dim`` coordinates map onto a block (all sizes in coordinates or floats).

    group G: threads per row, about sqrt(d) (at least 8 coordinates each); padded: d rounded up
    to a multiple of 8G; per_thread E = padded / G (a multiple of 8, at most 64; E >= G when d is
    a power of two, as the Walsh-Hadamard split needs).
    rows = THREADS / G. The matmul gives thread t the micro-tile rows ty + TY*i (i < mr) by
    columns tx + TX*j (j < mc), tx = t % TX, ty = t // TX, mr * mc = E. The shared tile stores
    (r, j) at r * stride + j + j // 32 (a skew that spreads both layouts' accesses over banks).
    """
    top = _pow2_ceil(dim)
    group = max(1, min(1 << ((top.bit_length() - 1) // 2), top // 8))
    padded = -(-dim // (8 * group)) * 8 * group
    per_thread = padded // group
    rows = THREADS // group
    mr = 4 if rows % 4 == 0 else 2 if rows % 2 == 0 else 1
    staged = padded <= _STAGED_FLOATS
    stride = padded + padded // 32 if padded >= 32 else padded + 1
    return SimpleNamespace(
        group=group,
        padded=padded,
        per_thread=per_thread,
        rows=rows,
        mr=mr,
        mc=per_thread // mr,
        tx=group * mr,
        ty=rows // mr,
        staged=staged,
        k_tile=min(32, _pow2_floor(_STAGED_FLOATS // padded), padded & -padded) if staged else 1,
        stride=stride,
        tile=rows * stride,
    )


@functools.cache
def _row_functions(dim: int) -> SimpleNamespace:
    """Device functions for one dimension: layouts, butterflies, row sums and the in-place matmul.

    ``v`` is a thread's float32 register array [E]; ``tile`` the block's shared float32 tile; ``t``,
    ``g``, ``rho`` the thread, its place in its row's group and its row in the block (uint64).
    """
    geo = _geometry(dim)
    group, per, padded, stride = U(geo.group), U(geo.per_thread), U(geo.padded), U(geo.stride)
    mr, mc, tx_count, ty_count = U(geo.mr), U(geo.mc), U(geo.tx), U(geo.ty)
    staged, k_tile = geo.staged, U(geo.k_tile)
    k_trips = U(-(-geo.k_tile * geo.padded // THREADS))
    k_total = U(geo.k_tile * geo.padded)
    strided_stages = U(sum(1 for s in range(geo.per_thread.bit_length() - 1) if geo.group << s < dim))
    contiguous_stages = U(geo.group.bit_length() - 1)
    threads = U(THREADS)
    one, zero = U(1), U(0)
    acc_size, a_size, w_size = geo.per_thread, geo.mr, geo.mc

    @cuda.jit(device=True)
    def store(tile, rho, g, v, strided):
        """tile[rho, j] = v[m] for the thread's coordinates j (strided or contiguous)."""
        for m in range(per):
            j = g + group * m if strided else g * per + m
            tile[rho * stride + j + (j >> U(5))] = v[m]

    @cuda.jit(device=True)
    def load(tile, rho, g, v, strided):
        """v[m] = tile[rho, j] for the thread's coordinates j (strided or contiguous)."""
        for m in range(per):
            j = g + group * m if strided else g * per + m
            v[m] = tile[rho * stride + j + (j >> U(5))]

    @cuda.jit(device=True)
    def butterflies(v, stages):
        """Walsh-Hadamard butterflies of register spans 1, 2, .. 2^(stages-1) on v."""
        span = one
        for _ in range(stages):
            for m in range(per):
                if (m & span) == zero:
                    a = v[m]
                    b = v[m + span]
                    v[m] = a + b
                    v[m + span] = a - b
            span <<= one

    @cuda.jit(device=True)
    def hadamard_strided(v):
        """The butterflies of span >= G (span < d), on strided coordinates."""
        butterflies(v, strided_stages)

    @cuda.jit(device=True)
    def hadamard_contiguous(v):
        """The butterflies of span < G, on contiguous coordinates."""
        butterflies(v, contiguous_stages)

    @cuda.jit(device=True)
    def row_total(value, partial, totals, t, g, rho):
        """The sum of ``value`` over the row's G threads (float64); partial: shared [THREADS]."""
        partial[t] = value
        cuda.syncthreads()
        if g == zero:
            total = float64(0)
            for i in range(group):
                total += partial[t + i]
            totals[rho] = total
        cuda.syncthreads()
        return totals[rho]

    @cuda.jit(device=True)
    def matmul(tile, matrix, k_buffer, t):
        """tile[r] = tile[r] @ matrix for every row r, in place; matrix float32 [padded, padded].

        Begins with a barrier (so the tile's writers are done) and ends before the results are
        visible: call cuda.syncthreads() before reading the tile.
        """
        tx = t % tx_count
        ty = t // tx_count
        acc = cuda.local.array(acc_size, float32)
        a = cuda.local.array(a_size, float32)
        w = cuda.local.array(w_size, float32)
        for i in range(per):
            acc[i] = 0
        if not staged:
            cuda.syncthreads()
        for k0 in range(zero, padded, k_tile):
            if staged:
                cuda.syncthreads()
                for i in range(k_trips):
                    e = t + threads * i
                    if e < k_total:
                        k_buffer[e] = matrix[k0 + e // padded, e % padded]
                cuda.syncthreads()
            k_base = k0 + (k0 >> U(5))  # a k-tile never crosses a multiple of 32
            for kk in range(k_tile):
                for i in range(mr):
                    a[i] = tile[(ty + ty_count * i) * stride + k_base + kk]
                for j in range(mc):
                    if staged:
                        w[j] = k_buffer[kk * padded + tx + tx_count * j]
                    else:
                        w[j] = matrix[k0 + kk, tx + tx_count * j]
                for i in range(mr):
                    for j in range(mc):
                        acc[i * mc + j] += a[i] * w[j]
        cuda.syncthreads()
        for i in range(mr):
            for j in range(mc):
                c = tx + tx_count * j
                tile[(ty + ty_count * i) * stride + c + (c >> U(5))] = acc[i * mc + j]

    return SimpleNamespace(
        store=store,
        load=load,
        hadamard_strided=hadamard_strided,
        hadamard_contiguous=hadamard_contiguous,
        row_total=row_total,
        matmul=matmul,
    )


def _k_buffer_size(dim: int) -> int:
    geo = _geometry(dim)
    return geo.k_tile * geo.padded if geo.staged else 1


# ---------------------------------------------------------------------------------------------
# Kernels, compiled once per (dimension, bit width, rotation kind, flags): with these constants
# every loop bound is known to the compiler.


@functools.cache
def _encode_kernel(dim: int, bits: int, hadamard: bool, normalize: bool, prod: bool) -> Callable:
    """encode[blocks, THREADS](x, forward, hadamard_signs, projection, edges, centroids,
    codes, norms, signs, gammas): ROWS rows per block (see the module docstring)."""
    geo = _geometry(dim)
    f = _row_functions(dim)
    store, load, row_total, matmul = f.store, f.load, f.row_total, f.matmul
    hadamard_strided, hadamard_contiguous = f.hadamard_strided, f.hadamard_contiguous
    rows, tile_size, k_size, per_thread = geo.rows, geo.tile, _k_buffer_size(dim), geo.per_thread
    group, per, d, row_count = U(geo.group), U(geo.per_thread), U(dim), U(geo.rows)
    levels = 1 << bits
    level_trips = U(-(-levels // THREADS))
    n_edges, n_levels, half_levels, bit_count = U(levels - 1), U(levels), U(levels >> 1), U(bits)
    bytes_per_thread = U(per_thread * bits // 8)
    n_bytes, sign_bytes = U(code_bytes(dim, bits)), U(code_bytes(dim, 1))
    sign_bytes_per_thread = U(per_thread // 8)
    rotation_scale = 1 / math.sqrt(dim) if hadamard else 1.0
    eight, one, zero, threads = U(8), U(1), U(0), U(THREADS)

    @cuda.jit
    def encode(x, forward, hadamard_signs, projection, edges, centroids, codes, norms, signs, gammas):
        t = uint64(cuda.threadIdx.x)
        g = t % group
        rho = t // group
        row = uint64(cuda.blockIdx.x) * row_count + rho
        valid = row < uint64(x.shape[0])
        tile = cuda.shared.array(tile_size, float32)
        k_buffer = cuda.shared.array(k_size, float32)
        edge_s = cuda.shared.array(levels, float32)
        centroid_s = cuda.shared.array(levels, float32)
        partial = cuda.shared.array(THREADS, float64)
        totals = cuda.shared.array(rows, float64)
        v = cuda.local.array(per_thread, float32)
        indices = cuda.local.array(per_thread, uint8)

        for i in range(level_trips):
            e = t + threads * i
            if e < n_edges:
                edge_s[e] = edges[e]
            if e < n_levels:
                centroid_s[e] = centroids[e]
        squares = float64(0)
        for m in range(per):
            j = g + group * m
            value = float32(0)
            if valid and j < d:
                value = x[row, j]
                if hadamard:
                    value *= hadamard_signs[j]
            v[m] = value
            squares += float64(value) * float64(value)
        norm = math.sqrt(row_total(squares, partial, totals, t, g, rho))
        if valid and g == zero:
            norms[row] = norm
        row_scale = 1.0
        if normalize and norm > 0:
            row_scale = 1.0 / norm
        scale = float32(row_scale) * float32(rotation_scale)

        if hadamard:  # y = H (signs x) / sqrt(d); the 1/sqrt(d) is in scale
            hadamard_strided(v)
            store(tile, rho, g, v, True)
            cuda.syncthreads()
            load(tile, rho, g, v, False)
            hadamard_contiguous(v)
        else:  # y = x @ Pi^T
            store(tile, rho, g, v, True)
            matmul(tile, forward, k_buffer, t)
            cuda.syncthreads()
            load(tile, rho, g, v, False)

        squares = float64(0)
        for m in range(per):
            value = v[m] * scale
            index = zero
            step = half_levels
            for _ in range(bit_count):
                if value > edge_s[index + step - one]:
                    index += step
                step >>= one
            residual = value - centroid_s[index]
            if g * per + m >= d:  # padding: code 0, no residual
                index = zero
                residual = float32(0)
            indices[m] = index
            if prod:
                v[m] = residual
                squares += float64(residual) * float64(residual)
        for q in range(bytes_per_thread):
            byte = zero
            for m in range(eight * q // bit_count, (eight * q + U(7)) // bit_count + one):
                low = m * bit_count
                if low >= eight * q:
                    byte |= uint64(indices[m]) << (low - eight * q)
                else:
                    byte |= uint64(indices[m]) >> (eight * q - low)
            p = g * bytes_per_thread + q
            if valid and p < n_bytes:
                codes[row, p] = byte & U(255)

        if prod:
            gamma = math.sqrt(row_total(squares, partial, totals, t, g, rho))
            if valid and g == zero:
                gammas[row] = gamma
            store(tile, rho, g, v, False)
            matmul(tile, projection, k_buffer, t)  # S r = (S Pi^T) r_rot
            cuda.syncthreads()
            load(tile, rho, g, v, False)
            for q in range(sign_bytes_per_thread):
                byte = zero
                for b in range(eight):
                    if v[eight * q + b] >= 0 and g * per + eight * q + b < d:
                        byte |= one << b
                p = g * sign_bytes_per_thread + q
                if valid and p < sign_bytes:
                    signs[row, p] = byte

    return encode


@functools.cache
def _decode_kernel(dim: int, bits: int, hadamard: bool, has_norms: bool, prod: bool) -> Callable:
    """decode[blocks, THREADS](codes, norms, signs, gammas, inverse, hadamard_signs, qjl, centroids,
    out): out = (c[idx] s) @ Pi (+ (w sign) @ S for Prod), ROWS rows per block."""
    geo = _geometry(dim)
    f = _row_functions(dim)
    store, load, matmul = f.store, f.load, f.matmul
    hadamard_strided, hadamard_contiguous = f.hadamard_strided, f.hadamard_contiguous
    tile_size, k_size, per_thread = geo.tile, _k_buffer_size(dim), geo.per_thread
    group, per, d, row_count = U(geo.group), U(geo.per_thread), U(dim), U(geo.rows)
    levels = 1 << bits
    level_trips = U(-(-levels // THREADS))
    n_levels, bit_count, mask = U(levels), U(bits), U(levels - 1)
    packed_size = per_thread * bits // 8
    bytes_per_thread = U(packed_size)
    n_bytes, sign_bytes = U(code_bytes(dim, bits)), U(code_bytes(dim, 1))
    sign_bytes_per_thread = U(per_thread // 8)
    rotation_scale = 1 / math.sqrt(dim) if hadamard else 1.0
    sign_weight = qjl_scale(dim)
    eight, one, threads = U(8), U(1), U(THREADS)

    @cuda.jit
    def decode(codes, norms, signs, gammas, inverse, hadamard_signs, qjl, centroids, out):
        t = uint64(cuda.threadIdx.x)
        g = t % group
        rho = t // group
        row = uint64(cuda.blockIdx.x) * row_count + rho
        valid = row < uint64(codes.shape[0])
        tile = cuda.shared.array(tile_size, float32)
        k_buffer = cuda.shared.array(k_size, float32)
        centroid_s = cuda.shared.array(levels, float32)
        v = cuda.local.array(per_thread, float32)
        packed = cuda.local.array(packed_size, uint8)

        for i in range(level_trips):
            e = t + threads * i
            if e < n_levels:
                centroid_s[e] = centroids[e]
        scale = float32(1)
        if valid and has_norms:
            scale = norms[row]
        for q in range(bytes_per_thread):
            p = g * bytes_per_thread + q
            byte = uint8(0)
            if valid and p < n_bytes:
                byte = codes[row, p]
            packed[q] = byte
        cuda.syncthreads()  # the centroids are in place

        for m in range(per):  # contiguous coordinates g * E + m
            low = m * bit_count
            word = uint64(packed[low >> U(3)])
            if (low & U(7)) + bit_count > eight:
                word |= uint64(packed[(low >> U(3)) + one]) << eight
            value = centroid_s[(word >> (low & U(7))) & mask] * scale
            if g * per + m >= d:
                value = float32(0)
            v[m] = value

        if hadamard:  # x = signs * (H y) / sqrt(d)
            hadamard_contiguous(v)
            store(tile, rho, g, v, False)
            cuda.syncthreads()
            load(tile, rho, g, v, True)
            hadamard_strided(v)
            for m in range(per):
                j = g + group * m
                if j < d:
                    v[m] *= hadamard_signs[j] * float32(rotation_scale)
        else:  # x = y @ Pi
            store(tile, rho, g, v, False)
            matmul(tile, inverse, k_buffer, t)
            cuda.syncthreads()
            load(tile, rho, g, v, True)

        if prod:  # x += (w sign) @ S
            weight = float32(0)
            if valid:
                weight = float32(sign_weight) * gammas[row] * scale
            sign = cuda.local.array(per_thread, float32)
            for q in range(sign_bytes_per_thread):
                p = g * sign_bytes_per_thread + q
                byte = uint64(0)
                if valid and p < sign_bytes:
                    byte = uint64(signs[row, p])
                for b in range(eight):
                    value = -weight
                    if (byte >> b) & one:
                        value = weight
                    if g * per + eight * q + b >= d:
                        value = float32(0)
                    sign[eight * q + b] = value
            cuda.syncthreads()  # every thread has read the tile
            store(tile, rho, g, sign, False)
            matmul(tile, qjl, k_buffer, t)
            cuda.syncthreads()
            load(tile, rho, g, sign, True)
            for m in range(per):
                v[m] += sign[m]

        if valid:
            for m in range(per):
                j = g + group * m
                if j < d:
                    out[row, j] = v[m]

    return decode


@functools.cache
def _transform_kernel(dim: int, hadamard: bool) -> Callable:
    """transform[blocks, THREADS](src, matrix, hadamard_signs, out): out = src @ matrix (matrix
    zero-padded [padded, padded]), or for Hadamard out = H (signs src) / sqrt(d); src [m, d]."""
    geo = _geometry(dim)
    f = _row_functions(dim)
    store, load, matmul = f.store, f.load, f.matmul
    hadamard_strided, hadamard_contiguous = f.hadamard_strided, f.hadamard_contiguous
    tile_size, k_size, per_thread = geo.tile, _k_buffer_size(dim), geo.per_thread
    group, per, d, row_count = U(geo.group), U(geo.per_thread), U(dim), U(geo.rows)
    rotation_scale = 1 / math.sqrt(dim) if hadamard else 1.0

    @cuda.jit
    def transform(src, matrix, hadamard_signs, out):
        t = uint64(cuda.threadIdx.x)
        g = t % group
        rho = t // group
        row = uint64(cuda.blockIdx.x) * row_count + rho
        valid = row < uint64(src.shape[0])
        tile = cuda.shared.array(tile_size, float32)
        k_buffer = cuda.shared.array(k_size, float32)
        v = cuda.local.array(per_thread, float32)
        for m in range(per):
            j = g + group * m
            value = float32(0)
            if valid and j < d:
                value = src[row, j]
                if hadamard:
                    value *= hadamard_signs[j]
            v[m] = value
        if hadamard:
            hadamard_strided(v)
            store(tile, rho, g, v, True)
            cuda.syncthreads()
            load(tile, rho, g, v, False)
            hadamard_contiguous(v)
        else:
            store(tile, rho, g, v, True)
            matmul(tile, matrix, k_buffer, t)
            cuda.syncthreads()
            load(tile, rho, g, v, False)
        for m in range(per):
            j = g * per + m
            if valid and j < d:
                out[row, j] = v[m] * float32(rotation_scale)

    return transform


def _query_tile(dim: int, m: int) -> int:
    """Queries per scores pass: up to 8, fewer for few queries or when [tile, d] passes 8 KiB."""
    padded = -(-dim // _CODE_CHUNK) * _CODE_CHUNK
    return max(1, min(_MAX_QUERY_TILE, _pow2_ceil(m), _pow2_floor(max(1, _QUERY_FLOATS // padded))))


@functools.cache
def _scores_kernel(dim: int, bits: int, has_norms: bool, prod: bool, query_tile: int) -> Callable:
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


# ---------------------------------------------------------------------------------------------
# Arrays in and out, and the per-quantizer constants on the device.


def _as_device(array: Any) -> Any:
    """A GPU array as a Numba device array, without a copy."""
    return array if getattr(array, "__cuda_ndarray__", False) else cuda.as_cuda_array(array)


def _floats(array: Any, name: str) -> Any:
    """A float32 device array of ``array``: GPU arrays as they are (float32 only), host floats copied."""
    if is_gpu_array(array):
        device = _as_device(array)
        if device.dtype != np.float32:
            raise TypeError(f"{name} on the GPU must be float32, got {device.dtype}")
        return device
    host = np.asarray(array)
    if host.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got {host.dtype}")
    return cuda.to_device(np.ascontiguousarray(host, dtype=np.float32))


def _bytes(array: Any, name: str) -> Any:
    """A uint8 device array of ``array`` (GPU arrays as they are)."""
    device = _as_device(array) if is_gpu_array(array) else None
    dtype = device.dtype if device is not None else np.asarray(array).dtype
    if dtype != np.uint8:
        raise TypeError(f"{name} must be uint8, got {dtype}")
    return device if device is not None else cuda.to_device(np.ascontiguousarray(array))


def _check_shape(array: Any, shape: tuple[int, ...], name: str) -> None:
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(array.shape)}")


def _rows_of(array: Any, dim: int, name: str) -> int:
    """The row count of a [n, dim] array, or ValueError."""
    if len(array.shape) != 2 or array.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {list(array.shape)}")
    return int(array.shape[0])


def _results(on_device: bool, *arrays: Any) -> Any:
    """The kernel's device arrays, or host copies of them; one array or a tuple."""
    out = arrays if on_device else tuple(array.copy_to_host() for array in arrays)
    return out[0] if len(out) == 1 else out


_constants: dict[tuple, Any] = {}


def _cached(tag: str, sources: tuple[np.ndarray, ...], build: Callable[[], Any]) -> Any:
    """``build()``, cached while every array in ``sources`` is alive (keyed by their identities)."""
    key = (tag, *(id(source) for source in sources))
    value = _constants.get(key)
    if value is None:
        value = build()
        _constants[key] = value
        for source in sources:
            weakref.finalize(source, _constants.pop, key, None)
    return value


def _upload(array: np.ndarray) -> Any:
    return cuda.to_device(np.ascontiguousarray(array, dtype=np.float32))


def _upload_padded(matrix: np.ndarray) -> Any:
    """A [d, d] matrix as float32 [padded, padded] on the device, zero outside the top-left d x d."""
    dim = matrix.shape[0]
    padded = np.zeros((_geometry(dim).padded,) * 2, np.float32)
    padded[:dim, :dim] = matrix
    return cuda.to_device(padded)


@functools.cache
def _placeholder(dtype: type, ndim: int) -> Any:
    """A one-element device array standing in for an argument a kernel variant does not read."""
    return cuda.to_device(np.zeros((1,) * ndim, dtype))


def _rotation_constants(rotation: Rotation) -> SimpleNamespace:
    """forward Pi^T, inverse Pi (Haar) and the signs (Hadamard), on the device."""

    def build() -> SimpleNamespace:
        if rotation.kind == "hadamard":
            matrix = _placeholder(np.float32, 2)
            return SimpleNamespace(forward=matrix, inverse=matrix, signs=_upload(rotation.signs))
        return SimpleNamespace(
            forward=_upload_padded(rotation.matrix.T),
            inverse=_upload_padded(rotation.matrix),
            signs=_placeholder(np.float32, 1),
        )

    return _cached("rotation", (rotation.matrix,), build)


def _qjl_constants(rotation: Rotation, qjl: np.ndarray) -> SimpleNamespace:
    """projection Pi S^T (rotated residual -> S r), S (decode) and S^T (queries), on the device."""

    def build() -> SimpleNamespace:
        s64 = qjl.astype(np.float64)
        return SimpleNamespace(
            projection=_upload_padded(rotation.matrix.astype(np.float64) @ s64.T),
            matrix=_upload_padded(qjl),
            transposed=_upload_padded(qjl.T),
        )

    return _cached("qjl", (rotation.matrix, qjl), build)


def _codebook_constants(codebook: Codebook) -> SimpleNamespace:
    """The codebook's edges and centroids as float32 device arrays."""

    def build() -> SimpleNamespace:
        return SimpleNamespace(edges=_upload(codebook.edges), centroids=_upload(codebook.centroids))

    return _cached("codebook", (codebook.edges, codebook.centroids), build)


def _tile_blocks(n: int, dim: int) -> int:
    return (n + _geometry(dim).rows - 1) // _geometry(dim).rows


def _optional_floats(array: Any, n: int, name: str) -> Any:
    """float32 [n] on the device, or a placeholder for None."""
    if array is None:
        return _placeholder(np.float32, 1)
    device = _floats(array, name)
    _check_shape(device, (n,), name)
    return device


def _rotate_queries(queries: Any, rotation: Rotation, matrix: Any | None = None) -> Any:
    """queries @ Pi^T (or @ matrix, a zero-padded [padded, padded] device array) -> float32 [m, d]."""
    dim = rotation.dim
    m = queries.shape[0]
    out = cuda.device_array((m, dim), np.float32)
    if matrix is None:
        constants = _rotation_constants(rotation)
        kernel = _transform_kernel(dim, rotation.kind == "hadamard")
        kernel[_tile_blocks(m, dim), THREADS](queries, constants.forward, constants.signs, out)
    else:
        kernel = _transform_kernel(dim, False)
        kernel[_tile_blocks(m, dim), THREADS](queries, matrix, _placeholder(np.float32, 1), out)
    return out


# ---------------------------------------------------------------------------------------------
# The backend contract (see tq.kernels.naive)


def mse_encode(x: Any, rotation: Rotation, codebook: Codebook, normalize: bool) -> tuple[Any, Any]:
    """Rotate, quantize, pack -> (codes uint8 [n, ceil(d*b/8)], norms float32 [n])."""
    on_device = is_gpu_array(x)
    x = _floats(x, "x")
    dim, bits = rotation.dim, codebook.bits
    n = _rows_of(x, dim, "x")
    codes = cuda.device_array((n, code_bytes(dim, bits)), np.uint8)
    norms = cuda.device_array(n, np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = _encode_kernel(dim, bits, rotation.kind == "hadamard", bool(normalize), False)
        kernel[_tile_blocks(n, dim), THREADS](
            x,
            rot.forward,
            rot.signs,
            _placeholder(np.float32, 2),
            book.edges,
            book.centroids,
            codes,
            norms,
            _placeholder(np.uint8, 2),
            _placeholder(np.float32, 1),
        )
    return _results(on_device, codes, norms)


def mse_decode(codes: Any, norms: Any | None, rotation: Rotation, codebook: Codebook) -> Any:
    """Unpack, look up centroids, rotate back, scale by norms -> float32 [n, d]."""
    on_device = is_gpu_array(codes)
    codes = _bytes(codes, "codes")
    dim, bits = rotation.dim, codebook.bits
    n = _rows_of(codes, code_bytes(dim, bits), "codes")
    norms_d = _optional_floats(norms, n, "norms")
    out = cuda.device_array((n, dim), np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = _decode_kernel(dim, bits, rotation.kind == "hadamard", norms is not None, False)
        kernel[_tile_blocks(n, dim), THREADS](
            codes,
            norms_d,
            _placeholder(np.uint8, 2),
            _placeholder(np.float32, 1),
            rot.inverse,
            rot.signs,
            _placeholder(np.float32, 2),
            book.centroids,
            out,
        )
    return _results(on_device, out)


def _launch_scores(
    queries: Any,
    codes: Any,
    signs: Any | None,
    gammas: Any | None,
    norms: Any | None,
    rotation: Rotation,
    qjl: np.ndarray | None,
    codebook: Codebook,
) -> Any:
    """The scores kernel for MSE (signs, gammas, qjl None) or Prod -> float32 [m, n]."""
    on_device = is_gpu_array(queries)
    queries = _floats(queries, "queries")
    dim, bits = rotation.dim, codebook.bits
    m = _rows_of(queries, dim, "queries")
    codes = _bytes(codes, "codes")
    n = _rows_of(codes, code_bytes(dim, bits), "codes")
    prod = qjl is not None
    norms_d = _optional_floats(norms, n, "norms")
    gammas_d = _optional_floats(gammas, n, "gammas")
    if prod:
        signs = _bytes(signs, "signs")
        _check_shape(signs, (n, code_bytes(dim, 1)), "signs")
    else:
        signs = _placeholder(np.uint8, 2)
    out = cuda.device_array((m, n), np.float32)
    if m and n:
        rotated = _rotate_queries(queries, rotation)
        projected = (
            _rotate_queries(queries, rotation, _qjl_constants(rotation, qjl).transposed)
            if prod
            else _placeholder(np.float32, 2)
        )
        book = _codebook_constants(codebook)
        query_tile = _query_tile(dim, m)
        query_blocks = min(-(-m // query_tile), 65535)
        kernel = _scores_kernel(dim, bits, norms is not None, prod, query_tile)
        kernel[((n + THREADS - 1) // THREADS, query_blocks), THREADS](
            rotated, projected, codes, signs, norms_d, gammas_d, book.centroids, out
        )
    return _results(on_device, out)


def mse_scores(queries: Any, codes: Any, norms: Any | None, rotation: Rotation, codebook: Codebook) -> Any:
    """Estimates of <q_i, x_j> from the codes: <Pi q_i, c[idx_j]> |x_j| -> float32 [m, n]."""
    return _launch_scores(queries, codes, None, None, norms, rotation, None, codebook)


def prod_encode(
    x: Any, rotation: Rotation, qjl: np.ndarray, codebook: Codebook, normalize: bool
) -> tuple[Any, Any, Any, Any]:
    """Algorithm 2 in one kernel -> (codes, signs uint8 [n, ceil(d/8)], gammas, norms float32 [n])."""
    on_device = is_gpu_array(x)
    x = _floats(x, "x")
    dim, bits = rotation.dim, codebook.bits
    n = _rows_of(x, dim, "x")
    codes = cuda.device_array((n, code_bytes(dim, bits)), np.uint8)
    signs = cuda.device_array((n, code_bytes(dim, 1)), np.uint8)
    gammas = cuda.device_array(n, np.float32)
    norms = cuda.device_array(n, np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = _encode_kernel(dim, bits, rotation.kind == "hadamard", bool(normalize), True)
        kernel[_tile_blocks(n, dim), THREADS](
            x,
            rot.forward,
            rot.signs,
            _qjl_constants(rotation, qjl).projection,
            book.edges,
            book.centroids,
            codes,
            norms,
            signs,
            gammas,
        )
    return _results(on_device, codes, signs, gammas, norms)


def prod_decode(
    codes: Any,
    signs: Any,
    gammas: Any,
    norms: Any | None,
    rotation: Rotation,
    qjl: np.ndarray,
    codebook: Codebook,
) -> Any:
    """x~ = Pi^T c[idx] + sqrt(pi/2)/d * gamma * S^T sign, scaled by norms -> float32 [n, d]."""
    on_device = is_gpu_array(codes)
    codes = _bytes(codes, "codes")
    dim, bits = rotation.dim, codebook.bits
    n = _rows_of(codes, code_bytes(dim, bits), "codes")
    signs = _bytes(signs, "signs")
    _check_shape(signs, (n, code_bytes(dim, 1)), "signs")
    gammas_d = _optional_floats(gammas, n, "gammas")
    norms_d = _optional_floats(norms, n, "norms")
    out = cuda.device_array((n, dim), np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = _decode_kernel(dim, bits, rotation.kind == "hadamard", norms is not None, True)
        kernel[_tile_blocks(n, dim), THREADS](
            codes,
            norms_d,
            signs,
            gammas_d,
            rot.inverse,
            rot.signs,
            _qjl_constants(rotation, qjl).matrix,
            book.centroids,
            out,
        )
    return _results(on_device, out)


def prod_scores(
    queries: Any,
    codes: Any,
    signs: Any,
    gammas: Any,
    norms: Any | None,
    rotation: Rotation,
    qjl: np.ndarray,
    codebook: Codebook,
) -> Any:
    """Unbiased estimates of <q_i, x_j>: <Pi q, c[idx]> + sqrt(pi/2)/d gamma <S q, sign> -> [m, n]."""
    return _launch_scores(queries, codes, signs, gammas, norms, rotation, qjl, codebook)

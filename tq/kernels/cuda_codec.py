"""The numba.cuda encode, decode and rotation kernels of the GPU backend (:mod:`tq.kernels.cuda`),
compiled once per (dimension, bit width, rotation kind, flags): with these constants every loop
bound is known to the compiler, and the device functions they share. Rows map onto blocks as
:mod:`tq.kernels.cuda_geometry` describes. Loops over E, over the bytes of a thread and over a
k-tile have constant trip counts, so they unroll and the register arrays stay in registers.

- encode (one kernel): load the strided coordinates, row norm in float64 (sum in registers, then
  across the row's threads), rotate, switch to contiguous, quantize by binary search over the cell
  edges in shared memory (the number of edges < value, so ties go to the lower cell), pack
  E*b/8 bytes per thread in the layout of :mod:`tq.core.packing`. Hadamard rotation: the
  butterflies (strided, then contiguous). Haar rotation: the tile is multiplied in place by the
  zero-padded Pi^T, each thread accumulating a register micro-tile (rows x strided columns) over
  k-tiles of the matrix staged in shared memory (read from global memory for d > 2048). Prod
  continues in the same kernel: the residual stays in the rotated domain, gamma is its norm, and
  S r = (S Pi^T) r_rot is a second in-place product whose signs are packed E/8 bytes per thread.
- decode: the reverse: unpack E codes per thread and look up centroids (times the norm), rotate
  back (butterflies, or the product with Pi), and for Prod add (w sign) @ S with
  w = sqrt(pi/2)/d * gamma * norm.
- transform: the rotation alone (rows @ a zero-padded matrix, or the Hadamard transform), for
  the queries of the scores kernels.

The device functions live in this module, beside the kernels that call them: Numba's CUDA
simulator swaps the ``cuda`` module in a function's module globals while it runs, so a device
function of another module would see the real module whenever another thread left a device
function of that module first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import SimpleNamespace

from numba import cuda, float32, float64, uint8, uint64

from tq.core.packing import code_bytes
from tq.kernels.cuda_device import THREADS, U
from tq.kernels.cuda_geometry import geometry, k_buffer_size
from tq.kernels.naive import qjl_scale

__all__ = ["decode_kernel", "encode_kernel", "transform_kernel"]


@functools.cache
def _row_functions(dim: int) -> SimpleNamespace:
    """Device functions for one dimension: layouts, butterflies, row sums and the in-place matmul.

    ``v`` is a thread's float32 register array [E]; ``tile`` the block's shared float32 tile; ``t``,
    ``g``, ``rho`` the thread, its place in its row's group and its row in the block (uint64).
    """
    geo = geometry(dim)
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


@functools.cache
def encode_kernel(dim: int, bits: int, hadamard: bool, normalize: bool, prod: bool) -> Callable:
    """encode[blocks, THREADS](x, forward, hadamard_signs, projection, edges, centroids,
    codes, norms, signs, gammas): geometry(dim).rows rows per block (see the module docstring)."""
    geo = geometry(dim)
    f = _row_functions(dim)
    store, load, row_total, matmul = f.store, f.load, f.row_total, f.matmul
    hadamard_strided, hadamard_contiguous = f.hadamard_strided, f.hadamard_contiguous
    rows, tile_size, k_size, per_thread = geo.rows, geo.tile, k_buffer_size(dim), geo.per_thread
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
def decode_kernel(dim: int, bits: int, hadamard: bool, has_norms: bool, prod: bool) -> Callable:
    """decode[blocks, THREADS](codes, norms, signs, gammas, inverse, hadamard_signs, qjl, centroids,
    out): out = (c[idx] s) @ Pi (+ (w sign) @ S for Prod), geometry(dim).rows rows per block."""
    geo = geometry(dim)
    f = _row_functions(dim)
    store, load, matmul = f.store, f.load, f.matmul
    hadamard_strided, hadamard_contiguous = f.hadamard_strided, f.hadamard_contiguous
    tile_size, k_size, per_thread = geo.tile, k_buffer_size(dim), geo.per_thread
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
def transform_kernel(dim: int, hadamard: bool) -> Callable:
    """transform[blocks, THREADS](src, matrix, hadamard_signs, out): out = src @ matrix (matrix
    zero-padded [padded, padded]), or for Hadamard out = H (signs src) / sqrt(d); src [m, d]."""
    geo = geometry(dim)
    f = _row_functions(dim)
    store, load, matmul = f.store, f.load, f.matmul
    hadamard_strided, hadamard_contiguous = f.hadamard_strided, f.hadamard_contiguous
    tile_size, k_size, per_thread = geo.tile, k_buffer_size(dim), geo.per_thread
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

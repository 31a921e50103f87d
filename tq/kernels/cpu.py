"""Numba CPU kernels: the default backend, tested against :mod:`tq.kernels.reference`.

Same functions, arguments and results as the reference (see its docstring for shapes). Rows are
split into chunks that run on a pool of kernel threads; within a chunk, an encode is one
rotation followed by one fused Numba pass (norm, scale, quantize, pack), and a decode is one
fused pass (unpack, centroid look-up, scale) followed by one inverse rotation. Rotations are
float32 matrix products through NumPy's BLAS, single-threaded per chunk (on this CPU a dense
product beats a Numba Walsh-Hadamard transform, so the Hadamard rotation is applied as its
dense matrix too). Inner products never reconstruct x: each query is rotated once and turned
into a look-up table lut[j, k] = (Pi q)_j * c_k that the packed codes index.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from tq.codebook import Codebook
from tq.kernels.reference import qjl_scale
from tq.packing import code_bytes
from tq.rotation import Rotation

_FASTMATH = {"contract", "reassoc"}  # vectorize sums; keep NaN and inf semantics
_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)

# ---------------------------------------------------------------------------------------------
# Row helpers (inlined into the parallel loops)


@_jit
def _pack_row(indices: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Pack indices uint8 [d] into ``out`` uint8 [ceil(d*bits/8)] (layout of tq.packing)."""
    dim = indices.shape[0]
    for p in range(out.shape[0]):
        low = 8 * p
        first = low // bits
        last = min(dim - 1, (low + 7) // bits)
        acc = 0
        for j in range(first, last + 1):
            shift = j * bits - low
            value = np.int32(indices[j])
            acc |= (value << shift) if shift >= 0 else (value >> -shift)
        out[p] = acc & 255


@_jit
def _unpack_row(packed: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Unpack ``packed`` uint8 [ceil(d*bits/8)] into indices int32 [d]."""
    mask = (1 << bits) - 1
    last = packed.shape[0] - 1
    for j in range(out.shape[0]):
        start = j * bits
        p = start >> 3
        word = np.int32(packed[p])
        if p < last:
            word |= np.int32(packed[p + 1]) << 8
        out[j] = (word >> (start & 7)) & mask


@_jit
def _quantize_row(y: np.ndarray, scale: np.float32, edges: np.ndarray, bits: int, out: np.ndarray) -> None:
    """out[j] = number of edges < y[j] * scale (the nearest centroid; ties go to the lower cell)."""
    dim = y.shape[0]
    if bits <= 4:  # a branch-free count over <= 15 edges vectorizes across j
        for j in range(dim):
            out[j] = 0
        for e in range(edges.shape[0]):
            edge = edges[e]
            for j in range(dim):
                out[j] += y[j] * scale > edge
    else:  # binary search over 2^bits - 1 edges
        for j in range(dim):
            value = y[j] * scale
            index = 0
            step = 1 << (bits - 1)
            while step > 0:
                if value > edges[index + step - 1]:
                    index += step
                step >>= 1
            out[j] = index


@_jit
def _row_norm(y: np.ndarray) -> float:
    total = 0.0
    for j in range(y.shape[0]):
        total += np.float64(y[j]) * np.float64(y[j])
    return math.sqrt(total)


# ---------------------------------------------------------------------------------------------
# Parallel passes. Each splits its rows into blocks of _BLOCK rows, one task per block, so that
# scratch arrays are allocated once per block rather than once per row.

_BLOCK = 256


@_jit
def _aligned(dim: int, bits: int) -> bool:
    """Whether whole codes fill whole bytes (b in 1, 2, 4, 8 and d a multiple of 8 / b)."""
    return 8 % bits == 0 and dim % (8 // bits) == 0


@_jit
def _quantize_pack_aligned(y, scale, edges, bits, lanes, counts, packed, out):
    """Quantize and pack one row when codes fill whole bytes, vectorized across bytes.

    Code t of byte p (coordinate p * per + t) is counted in ``lanes[t, p]``, so the edge
    comparisons and the packing shifts run over contiguous arrays. Scratch: lanes float32
    [per, nbytes], counts and packed int32 [nbytes].
    """
    per, nbytes = lanes.shape
    for t in range(per):
        for p in range(nbytes):
            lanes[t, p] = y[p * per + t] * scale
    for p in range(nbytes):
        packed[p] = 0
    for t in range(per):
        for p in range(nbytes):
            counts[p] = 0
        for e in range(edges.shape[0]):
            edge = edges[e]
            for p in range(nbytes):
                counts[p] += np.int32(lanes[t, p] > edge)
        for p in range(nbytes):
            packed[p] |= counts[p] << (t * bits)
    for p in range(nbytes):
        out[p] = packed[p]


@_jit
def _quantize_pack_row(y, scale, edges, bits, indices, lanes, counts, packed, out):
    """Quantize one rotated row y * scale and pack it into ``out``."""
    if _aligned(y.shape[0], bits) and bits <= 4:
        _quantize_pack_aligned(y, scale, edges, bits, lanes, counts, packed, out)
    else:
        _quantize_row(y, scale, edges, bits, indices)
        _pack_row(indices, bits, out)


@_jit
def _scratch(dim, bits):
    per = 8 // bits if 8 % bits == 0 else 1
    nbytes = (dim * bits + 7) // 8
    return (
        np.empty(dim, np.int32),
        np.empty((per, nbytes), np.float32),
        np.empty(nbytes, np.int32),
        np.empty(nbytes, np.int32),
    )


@_jit
def _encode_rows(y, edges, bits, normalize, codes, norms):
    """Per row of rotated y float32 [n, d]: norm, scale, quantize, pack."""
    n, dim = y.shape
    for block in range((n + _BLOCK - 1) // _BLOCK):
        indices, lanes, counts, packed = _scratch(dim, bits)
        for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            norm = _row_norm(y[i])
            norms[i] = norm
            scale = np.float32(1.0 / norm) if normalize and norm > 0 else np.float32(1.0)
            _quantize_pack_row(y[i], scale, edges, bits, indices, lanes, counts, packed, codes[i])


@_jit
def _encode_rows_residual(y, edges, centroids, bits, normalize, codes, norms, residual, gammas):
    """As _encode_rows, and also the rotated residual y/|y| - c[idx] and its norm gamma."""
    n, dim = y.shape
    for block in range((n + _BLOCK - 1) // _BLOCK):
        indices = np.empty(dim, np.int32)
        for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            norm = _row_norm(y[i])
            norms[i] = norm
            scale = np.float32(1.0 / norm) if normalize and norm > 0 else np.float32(1.0)
            _quantize_row(y[i], scale, edges, bits, indices)
            _pack_row(indices, bits, codes[i])
            for j in range(dim):
                residual[i, j] = y[i, j] * scale - centroids[indices[j]]
            gammas[i] = _row_norm(residual[i])


@_jit
def _pack_sign_rows(projected, signs):
    """signs[i] = packed (projected[i] >= 0), one bit per coordinate."""
    n, dim = projected.shape
    for block in range((n + _BLOCK - 1) // _BLOCK):
        positive = np.empty(dim, np.int32)
        for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            for j in range(dim):
                positive[j] = projected[i, j] >= 0
            _pack_row(positive, 1, signs[i])


@_jit
def _byte_table(centroids, bits):
    """table[v, t] = centroids of the t-th code in byte value v, float32 [256, 8 / bits]."""
    per = 8 // bits
    mask = (1 << bits) - 1
    table = np.empty((256, per), np.float32)
    for v in range(256):
        for t in range(per):
            table[v, t] = centroids[(v >> (t * bits)) & mask]
    return table


@_jit
def _lookup_row(packed, centroids, table, bits, scale, indices, out):
    """out[j] = centroids[idx_j] * scale for one packed row."""
    dim = out.shape[0]
    if _aligned(dim, bits):
        per = table.shape[1]
        for p in range(packed.shape[0]):
            for t in range(per):
                out[p * per + t] = table[packed[p], t] * scale
    else:
        _unpack_row(packed, bits, indices)
        for j in range(dim):
            out[j] = centroids[indices[j]] * scale


@_jit
def _lookup_rows(codes, centroids, bits, scales, out):
    """out[i, j] = centroids[idx_ij] * scales[i] for out float32 [n, d]."""
    n, dim = out.shape
    table = _byte_table(centroids, bits) if 8 % bits == 0 else np.empty((256, 1), np.float32)
    for block in range((n + _BLOCK - 1) // _BLOCK):
        indices = np.empty(dim, np.int32)
        for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            _lookup_row(codes[i], centroids, table, bits, scales[i], indices, out[i])


@_jit
def _lookup_prod_rows(codes, signs, centroids, bits, scales, qjl_weights, out):
    """out[i] = [c[idx_i] * s_i, w_i * sign_i] for out float32 [n, 2d] (one product decodes)."""
    n = out.shape[0]
    dim = out.shape[1] // 2
    table = _byte_table(centroids, bits) if 8 % bits == 0 else np.empty((256, 1), np.float32)
    for block in range((n + _BLOCK - 1) // _BLOCK):
        indices = np.empty(dim, np.int32)
        for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            _lookup_row(codes[i], centroids, table, bits, scales[i], indices, out[i, :dim])
            _unpack_row(signs[i], 1, indices)
            for j in range(dim):
                out[i, dim + j] = qjl_weights[i] * np.float32(2 * indices[j] - 1)


@_jit
def _lut_scores(luts, codes, bits, scales, out):
    """out[q, i] = scales[i] * sum_j luts[q, j, idx_ij]; luts float32 [m, d, 2^bits]."""
    m, dim, _ = luts.shape
    n = codes.shape[0]
    for block in range((n + _BLOCK - 1) // _BLOCK):
        indices = np.empty(dim, np.int32)
        for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            _unpack_row(codes[i], bits, indices)
            for q in range(m):
                total = np.float32(0.0)
                for j in range(dim):
                    total += luts[q, j, indices[j]]
                out[q, i] = total * scales[i]


@_jit
def _add_sign_scores(projected_queries, signs, weights, out):
    """out[q, i] += weights[i] * <projected_queries[q], sign_i>, sign_i in {-1, +1}^d."""
    m, dim = projected_queries.shape
    n = signs.shape[0]
    for block in range((n + _BLOCK - 1) // _BLOCK):
        indices = np.empty(dim, np.int32)
        for i in range(block * _BLOCK, min(n, (block + 1) * _BLOCK)):
            _unpack_row(signs[i], 1, indices)
            for q in range(m):
                total = np.float32(0.0)
                for j in range(dim):
                    total += projected_queries[q, j] * np.float32(2 * indices[j] - 1)
                out[q, i] += weights[i] * total


# ---------------------------------------------------------------------------------------------
# Rotations and the chunk driver. Work is split into chunks of rows; a chunk's buffers are
# small enough to stay in cache (a fresh 32 MB array costs as much in page faults as the product).

_CHUNK = 2048


def num_threads() -> int:
    """Worker threads for the kernels: ``$TQ_NUM_THREADS``, else the CPUs this process may use."""
    configured = os.environ.get("TQ_NUM_THREADS")
    if configured:
        return max(1, int(configured))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tq-kernel")


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _run_chunks(n: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(start, stop)`` over row chunks on the kernel threads.

    Each chunk runs rotation (single-threaded BLAS or FWHT) and its Numba pass back to back on
    one thread, so its data stays in that core's cache and only one thread pool is active
    (NumPy's BLAS pool and a Numba pool fighting over the cores cost half the speed).
    """
    chunks = [(start, min(n, start + _CHUNK)) for start in range(0, n, _CHUNK)]
    threads = min(num_threads(), len(chunks))
    if threads <= 1:
        for start, stop in chunks:
            work(start, stop)
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        for future in [_pool(threads).submit(work, start, stop) for start, stop in chunks]:
            future.result()


def _rotate_into(x: np.ndarray, rotation: Rotation, out: np.ndarray) -> None:
    """out = x @ Pi.T for float32 [n, d] arrays (Hadamard too: a dense product beats a Numba
    Walsh-Hadamard transform on this CPU)."""
    np.matmul(x, rotation.matrix.T, out=out)


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _scales(norms: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, np.float32) if norms is None else _f32(norms)


def _rotated(x: np.ndarray, rotation: Rotation) -> np.ndarray:
    """x @ Pi.T for a small array (queries)."""
    out = np.empty((x.shape[0], rotation.dim), np.float32)
    _rotate_into(_f32(x), rotation, out)
    return out


# ---------------------------------------------------------------------------------------------
# The backend contract (see tq.kernels.reference)


def mse_encode(
    x: np.ndarray, rotation: Rotation, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    n, dim = x.shape
    x = _f32(x)
    edges = _f32(codebook.edges)
    codes = np.empty((n, code_bytes(dim, codebook.bits)), np.uint8)
    norms = np.empty(n, np.float32)

    def work(start: int, stop: int) -> None:
        rotated = np.empty((stop - start, dim), np.float32)
        _rotate_into(x[start:stop], rotation, rotated)
        _encode_rows(rotated, edges, codebook.bits, normalize, codes[start:stop], norms[start:stop])

    _run_chunks(n, work)
    return codes, norms


def mse_decode(
    codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    n, dim = codes.shape[0], rotation.dim
    centroids = _f32(codebook.centroids)
    scales = _scales(norms, n)
    out = np.empty((n, dim), np.float32)

    def work(start: int, stop: int) -> None:
        looked_up = np.empty((stop - start, dim), np.float32)
        _lookup_rows(codes[start:stop], centroids, codebook.bits, scales[start:stop], looked_up)
        np.matmul(looked_up, rotation.matrix, out=out[start:stop])

    _run_chunks(n, work)
    return out


def _luts(rotated_queries: np.ndarray, codebook: Codebook) -> np.ndarray:
    """Per-query tables lut[q, j, k] = (Pi q)_j * c_k, float32 [m, d, 2^b]."""
    return _f32(rotated_queries[:, :, None] * _f32(codebook.centroids)[None, None, :])


def mse_scores(
    queries: np.ndarray, codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    n = codes.shape[0]
    out = np.empty((queries.shape[0], n), np.float32)
    luts = _luts(_rotated(queries, rotation), codebook)
    scales = _scales(norms, n)
    _run_chunks(
        n,
        lambda start, stop: _lut_scores(
            luts, codes[start:stop], codebook.bits, scales[start:stop], out[:, start:stop]
        ),
    )
    return out


def _qjl_projection(rotation: Rotation, qjl: np.ndarray) -> np.ndarray:
    """S Pi^T, float32 [d, d]: S r = (S Pi^T)(Pi r) keeps the residual in the rotated domain."""
    return _f32(qjl.astype(np.float64) @ rotation.matrix.T.astype(np.float64))


def prod_encode(
    x: np.ndarray, rotation: Rotation, qjl: np.ndarray, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n, dim = x.shape
    x = _f32(x)
    edges, centroids = _f32(codebook.edges), _f32(codebook.centroids)
    projection_t = _qjl_projection(rotation, qjl).T
    codes = np.empty((n, code_bytes(dim, codebook.bits)), np.uint8)
    signs = np.empty((n, code_bytes(dim, 1)), np.uint8)
    norms = np.empty(n, np.float32)
    gammas = np.empty(n, np.float32)

    def work(start: int, stop: int) -> None:
        rotated = np.empty((stop - start, dim), np.float32)
        residual = np.empty_like(rotated)
        _rotate_into(x[start:stop], rotation, rotated)
        _encode_rows_residual(
            rotated,
            edges,
            centroids,
            codebook.bits,
            normalize,
            codes[start:stop],
            norms[start:stop],
            residual,
            gammas[start:stop],
        )
        _pack_sign_rows(np.matmul(residual, projection_t, out=rotated), signs[start:stop])

    _run_chunks(n, work)
    return codes, signs, gammas, norms


def prod_decode(
    codes: np.ndarray,
    signs: np.ndarray,
    gammas: np.ndarray,
    norms: np.ndarray | None,
    rotation: Rotation,
    qjl: np.ndarray,
    codebook: Codebook,
) -> np.ndarray:
    n, dim = codes.shape[0], rotation.dim
    centroids = _f32(codebook.centroids)
    scales = _scales(norms, n)
    weights = _f32(qjl_scale(dim) * gammas * scales)
    # x~ = [c[idx] s, w sign] @ [Pi; S]: one [n, 2d] x [2d, d] product.
    stacked_matrix = np.concatenate([rotation.matrix, _f32(qjl)])
    out = np.empty((n, dim), np.float32)

    def work(start: int, stop: int) -> None:
        stacked = np.empty((stop - start, 2 * dim), np.float32)
        _lookup_prod_rows(
            codes[start:stop],
            signs[start:stop],
            centroids,
            codebook.bits,
            scales[start:stop],
            weights[start:stop],
            stacked,
        )
        np.matmul(stacked, stacked_matrix, out=out[start:stop])

    _run_chunks(n, work)
    return out


def prod_scores(
    queries: np.ndarray,
    codes: np.ndarray,
    signs: np.ndarray,
    gammas: np.ndarray,
    norms: np.ndarray | None,
    rotation: Rotation,
    qjl: np.ndarray,
    codebook: Codebook,
) -> np.ndarray:
    queries = _f32(queries)
    n = codes.shape[0]
    scales = _scales(norms, n)
    out = np.empty((queries.shape[0], n), np.float32)
    luts = _luts(_rotated(queries, rotation), codebook)
    weights = _f32(qjl_scale(rotation.dim) * gammas * scales)
    projected = _f32(queries @ _f32(qjl).T)

    def work(start: int, stop: int) -> None:
        part = out[:, start:stop]
        _lut_scores(luts, codes[start:stop], codebook.bits, scales[start:stop], part)
        _add_sign_scores(projected, signs[start:stop], weights[start:stop], part)

    _run_chunks(n, work)
    return out

"""Numba CPU kernels: the default backend, tested against :mod:`tq.kernels.naive`.

Same functions, arguments and results as the reference (see its docstring for shapes). Rows are
split into chunks that run on a pool of kernel threads; within a chunk, an encode is one
rotation followed by one fused Numba pass (norm, scale, quantize, pack), and a decode is one
fused pass (unpack, centroid look-up, scale) followed by one inverse rotation. A Haar rotation
is a BLAS product, single-threaded per chunk; a Hadamard rotation is a Numba fast
Walsh-Hadamard transform.

Codes do not depend on the BLAS: an encode's Haar rotation (and Prod's projection of the
residual, whose signs are stored) is a float64 product of the float32 inputs, rounded to
float32. The products are exact in float64 and only the summation order differs between
libraries and devices, a difference the rounding to float32 hides; the float32 arithmetic
after it (scale, compare with the edges, the residual) is written out one rounding at a time
(no fused multiply-add). So tq's torch codec (:mod:`tq.quant.torch_codec`) packs the same bytes
on any device. Decodes and inner products stay float32 products.

Inner products never reconstruct x: each query is rotated once and turned into a look-up table
lut[j, k] = (Pi q)_j * c_k that the packed codes index.

Besides the six backend functions, the pieces other CPU kernels (the packed-cache attention of
:mod:`tq.cache.attention`) are built from:

- Numba settings: :data:`FASTMATH`, :data:`jit` (compiled once, cached on disk) and
  :data:`jit_in_memory` (for kernels that call per-bit-width closures; ``jit_in_memory_exact``
  without fused multiply-adds);
- row kernels: :func:`row_kernels` (per bit width: pack, unpack, centroid tables, encode,
  look-up, scores), :func:`unpack_sign_row` and :func:`add_sign_scores` (QJL signs), and
  :func:`qjl_projection` (S Pi^T, which tq.quant.torch_codec shares);
- threads: :data:`CHUNK_ROWS`, :func:`num_threads`, :func:`thread_pool`, :func:`run_chunks` and
  :func:`single_threaded_blas`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from tq.core.codebook import Codebook
from tq.core.packing import code_bytes
from tq.core.rotation import Rotation
from tq.kernels.naive import qjl_scale

__all__ = [
    "CHUNK_ROWS",
    "FASTMATH",
    "add_sign_scores",
    "jit",
    "jit_in_memory",
    "mse_decode",
    "mse_encode",
    "mse_scores",
    "num_threads",
    "prod_decode",
    "prod_encode",
    "prod_scores",
    "qjl_projection",
    "row_kernels",
    "run_chunks",
    "single_threaded_blas",
    "thread_pool",
    "unpack_sign_row",
]

FASTMATH = {"contract", "reassoc"}  # vectorize sums; keep NaN and inf semantics
jit = numba.njit(cache=True, fastmath=FASTMATH, nogil=True)
# Kernels that call other per-bit-width kernels: Numba's on-disk cache never matches them in a new
# process (their callees are closure objects) and would add a file per process, so they compile
# in memory once per process instead.
jit_in_memory = numba.njit(cache=False, fastmath=FASTMATH, nogil=True)
# Kernels whose float32 results are stored bit for bit (Prod's residual): no contraction into a
# fused multiply-add, so that every backend rounds each product and difference the same way.
jit_in_memory_exact = numba.njit(cache=False, fastmath={"reassoc"}, nogil=True)


def _jit_specialized(tag: str) -> Callable[[Callable], Callable]:
    """``jit`` for one specialization of a kernel built per parameter value (a closure).

    Numba names a function's cache index after its qualified name and numbers the entries in it;
    two processes compiling different closures of one function at once (pipeline jobs at different
    bit widths) can take the same number and overwrite each other's code, so that a later process
    loads the wrong kernel. Suffixing the qualified name with ``tag`` gives every specialization
    its own index, where concurrent writers store identical code.
    """

    def compile_kernel(function: Callable) -> Callable:
        function.__qualname__ = f"{function.__qualname__}_{tag}"
        return jit(function)

    return compile_kernel


# ---------------------------------------------------------------------------------------------
# Row kernels, compiled once per bit width: with ``bits`` a compile-time constant every loop over
# edges, codes per byte and search steps unrolls, and the loops over a row vectorize. Each pass
# works on a contiguous range of rows on one thread; run_chunks spreads ranges over threads.


@jit
def _row_norm(y: np.ndarray) -> float:
    """L2 norm of a float32 row, accumulated in float64 (no overflow for finite input)."""
    total = 0.0
    for j in range(y.shape[0]):
        total += np.float64(y[j]) * np.float64(y[j])
    return math.sqrt(total)


@functools.cache
def row_kernels(bits: int) -> SimpleNamespace:
    """Numba kernels for codes of ``bits`` bits (layout of tq.core.packing)."""
    per_byte = 8 // bits if 8 % bits == 0 else 0  # codes per byte, when whole codes fill bytes
    mask = (1 << bits) - 1
    n_edges = (1 << bits) - 1
    linear_search = bits <= 4

    @_jit_specialized(f"b{bits}")
    def quantize_row(y, scale, edges, out):
        """out[j] = number of edges < y[j] * scale: the nearest centroid, ties to the lower."""
        for j in range(y.shape[0]):
            value = y[j] * scale
            if linear_search:
                count = np.int32(0)
                for e in range(n_edges):
                    count += np.int32(value > edges[e])
                out[j] = count
            else:
                index = 0
                for level in range(bits - 1, -1, -1):
                    step = 1 << level
                    if value > edges[index + step - 1]:
                        index += step
                out[j] = index

    @_jit_specialized(f"b{bits}")
    def pack_row(indices, out):
        """Pack int32 indices [d] into out uint8 [ceil(d * bits / 8)]."""
        dim = indices.shape[0]
        if per_byte and dim % per_byte == 0:
            for p in range(out.shape[0]):
                acc = np.int32(0)
                for t in range(per_byte):
                    acc |= indices[p * per_byte + t] << (t * bits)
                out[p] = acc
            return
        for p in range(out.shape[0]):
            low = 8 * p
            acc = 0
            for j in range(low // bits, min(dim - 1, (low + 7) // bits) + 1):
                shift = j * bits - low
                acc |= (indices[j] << shift) if shift >= 0 else (indices[j] >> -shift)
            out[p] = acc & 255

    @_jit_specialized(f"b{bits}")
    def unpack_row(packed, out):
        """Unpack packed uint8 [ceil(d * bits / 8)] into int32 indices out [d]."""
        last = packed.shape[0] - 1
        for j in range(out.shape[0]):
            start = j * bits
            p = start >> 3
            word = np.int32(packed[p])
            if p < last:
                word |= np.int32(packed[p + 1]) << 8
            out[j] = (word >> (start & 7)) & mask

    @_jit_specialized(f"b{bits}")
    def byte_table(centroids):
        """table[v, t] = centroid of the t-th code in byte value v, float32 [256, per_byte]."""
        table = np.zeros((256, max(per_byte, 1)), np.float32)
        for v in range(256):
            for t in range(per_byte):
                table[v, t] = centroids[(v >> (t * bits)) & mask]
        return table

    @jit_in_memory
    def encode_rows(y, edges, normalize, codes, norms):
        """Rows of rotated y float32 [n, d]: norm, scale, quantize, pack into codes."""
        indices = np.empty(y.shape[1], np.int32)
        for i in range(y.shape[0]):
            norm = _row_norm(y[i])
            norms[i] = norm
            scale = np.float32(1.0 / norm) if normalize and norm > 0 else np.float32(1.0)
            quantize_row(y[i], scale, edges, indices)
            pack_row(indices, codes[i])

    @jit_in_memory_exact
    def encode_rows_residual(y, edges, centroids, normalize, codes, norms, residual, gammas):
        """As encode_rows, plus the rotated residual y * scale - c[idx] and its norm gamma."""
        dim = y.shape[1]
        indices = np.empty(dim, np.int32)
        for i in range(y.shape[0]):
            norm = _row_norm(y[i])
            norms[i] = norm
            scale = np.float32(1.0 / norm) if normalize and norm > 0 else np.float32(1.0)
            quantize_row(y[i], scale, edges, indices)
            pack_row(indices, codes[i])
            for j in range(dim):
                value = y[i, j] * scale
                residual[i, j] = value - centroids[indices[j]]
            gammas[i] = _row_norm(residual[i])

    @jit_in_memory
    def lookup_rows(codes, centroids, scales, out):
        """out[i, j] = centroids[idx_ij] * scales[i] for out float32 [n, d]."""
        n, dim = out.shape
        if per_byte and dim % per_byte == 0:  # whole bytes through a [256, per_byte] table
            table = byte_table(centroids)
            for i in range(n):
                scale = scales[i]
                for p in range(codes.shape[1]):
                    value = codes[i, p]
                    for t in range(per_byte):
                        out[i, p * per_byte + t] = table[value, t] * scale
            return
        indices = np.empty(dim, np.int32)
        for i in range(n):
            unpack_row(codes[i], indices)
            for j in range(dim):
                out[i, j] = centroids[indices[j]] * scales[i]

    @jit_in_memory
    def lut_scores(luts, codes, scales, out):
        """out[q, i] = scales[i] * sum_j luts[q, j, idx_ij]; luts float32 [m, d, 2^bits]."""
        m, dim, _ = luts.shape
        indices = np.empty(dim, np.int32)
        for i in range(codes.shape[0]):
            unpack_row(codes[i], indices)
            for q in range(m):
                total = np.float32(0.0)
                for j in range(dim):
                    total += luts[q, j, indices[j]]
                out[q, i] = total * scales[i]

    return SimpleNamespace(
        pack_row=pack_row,
        unpack_row=unpack_row,
        byte_table=byte_table,
        encode_rows=encode_rows,
        encode_rows_residual=encode_rows_residual,
        lookup_rows=lookup_rows,
        lut_scores=lut_scores,
    )


_pack_sign_row = row_kernels(1).pack_row
unpack_sign_row = row_kernels(1).unpack_row  # sign bits uint8 [ceil(d/8)] -> int32 0/1 into out [d]


@jit
def _pack_sign_rows(projected, signs):
    """signs[i] = packed (projected[i] >= 0), one bit per coordinate."""
    n, dim = projected.shape
    positive = np.empty(dim, np.int32)
    for i in range(n):
        for j in range(dim):
            positive[j] = projected[i, j] >= 0
        _pack_sign_row(positive, signs[i])


@jit
def _signs_to_rows(signs, weights, out):
    """out[i, j] = weights[i] * (+1 if sign bit j of row i is set, else -1)."""
    dim = out.shape[1]
    bits = np.empty(dim, np.int32)
    for i in range(signs.shape[0]):
        unpack_sign_row(signs[i], bits)
        for j in range(dim):
            out[i, j] = weights[i] * np.float32(2 * bits[j] - 1)


@jit
def add_sign_scores(projected_queries, signs, weights, out):
    """out[q, i] += weights[i] * <projected_queries[q], sign_i>, sign_i in {-1, +1}^d."""
    m, dim = projected_queries.shape
    bits = np.empty(dim, np.int32)
    for i in range(signs.shape[0]):
        unpack_sign_row(signs[i], bits)
        for q in range(m):
            total = np.float32(0.0)
            for j in range(dim):
                total += projected_queries[q, j] * np.float32(2 * bits[j] - 1)
            out[q, i] += weights[i] * total


# ---------------------------------------------------------------------------------------------
# Rotations and the chunk driver. Work is split into chunks of rows; a chunk's buffers are
# small enough to stay in cache (a fresh 32 MB array costs as much in page faults as the product).

CHUNK_ROWS = 2048  # rows per work item of run_chunks


def num_threads() -> int:
    """Worker threads for the kernels: ``$TQ_NUM_THREADS``, else the CPUs this process may use."""
    configured = os.environ.get("TQ_NUM_THREADS")
    if configured:
        return max(1, int(configured))
    return _available_cpus()


@functools.cache
def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def thread_pool(threads: int) -> ThreadPoolExecutor:
    """The kernels' pool of ``threads`` worker threads (one per thread count, kept for the process)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tq-kernel")


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """A context in which NumPy's BLAS runs on the calling thread only (about 4 us to enter).

    For small products between other threaded work: BLAS threads woken for a few hundred rows
    then spin, stealing the cores from the next piece of work (ONNX Runtime's graph call in the
    decode loop ran 15-20% slower).
    """
    return _blas_controller().limit(limits=1, user_api="blas")


def run_chunks(n: int, work: Callable[[int, int], None], chunk: int = CHUNK_ROWS) -> None:
    """Run ``work(start, stop)`` over row chunks of ``chunk`` rows on the kernel threads.

    Each chunk runs rotation (single-threaded BLAS or FWHT) and its Numba pass back to back on
    one thread, so its data stays in that core's cache and only one thread pool is active
    (NumPy's BLAS pool and a Numba pool fighting over the cores cost half the speed).
    """
    if n <= chunk:  # one chunk (the decode loop's few rows): no threads to coordinate
        work(0, n)
        return
    chunks = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    threads = min(num_threads(), len(chunks))
    if threads <= 1:
        for start, stop in chunks:
            work(start, stop)
        return
    with single_threaded_blas():
        for future in [thread_pool(threads).submit(work, start, stop) for start, stop in chunks]:
            future.result()


_HADAMARD_BLOCK = 64


@functools.cache
def _hadamard_kernel(dim: int):
    """A Numba Walsh-Hadamard transform of rows of length ``dim`` (a power of two).

    Rows are transformed _HADAMARD_BLOCK at a time in a transposed scratch [dim, block], so every
    butterfly is a contiguous vector operation across the block's rows.
    """
    stages = dim.bit_length() - 1

    @_jit_specialized(f"d{dim}")
    def transform_rows(x, signs_in, signs_out, scale, out):
        """out[i] = signs_out * (H (signs_in * x[i])) * scale, H the Sylvester matrix."""
        columns = np.empty((dim, _HADAMARD_BLOCK), np.float32)
        for start in range(0, x.shape[0], _HADAMARD_BLOCK):
            rows = min(_HADAMARD_BLOCK, x.shape[0] - start)
            for r in range(rows):
                for j in range(dim):
                    columns[j, r] = x[start + r, j] * signs_in[j]
            for stage in range(stages):
                half = 1 << stage
                for k in range(dim // 2):
                    j = (k >> stage) * 2 * half + (k & (half - 1))
                    for r in range(_HADAMARD_BLOCK):
                        a = columns[j, r]
                        b = columns[j + half, r]
                        columns[j, r] = a + b
                        columns[j + half, r] = a - b
            for r in range(rows):
                for j in range(dim):
                    out[start + r, j] = columns[j, r] * (scale * signs_out[j])

    return transform_rows


def _rotate_into(x: np.ndarray, rotation: Rotation, out: np.ndarray) -> None:
    """out = x @ Pi.T for float32 [n, d] arrays: BLAS for Haar, the Numba FWHT for Hadamard."""
    if rotation.kind == "hadamard":
        ones = np.ones(rotation.dim, np.float32)
        scale = np.float32(1 / math.sqrt(rotation.dim))
        _hadamard_kernel(rotation.dim)(x, rotation.signs, ones, scale, out)
    else:
        np.matmul(x, rotation.matrix.T, out=out)


_scratch_buffers = threading.local()


def _scratch(name: str, shape: tuple[int, int]) -> np.ndarray:
    """A float64 buffer of ``shape`` reused by the calling thread (a fresh array of a chunk's
    size costs page faults on every call, as much as the product that fills it)."""
    buffers = _scratch_buffers.__dict__
    held = buffers.get(name)
    size = shape[0] * shape[1]
    if held is None or held.size < size:
        held = buffers[name] = np.empty(size, np.float64)
    return held[:size].reshape(shape)


def _exact_product_into(x: np.ndarray, matrix: np.ndarray, out: np.ndarray) -> None:
    """out = x @ matrix for float32 x [n, k] and a float64 matrix [k, m]: the float64 product of
    the float32 inputs, rounded to float32 once (see the module docstring)."""
    wide = _scratch("inputs", x.shape)
    np.copyto(wide, x)
    product = _scratch("product", out.shape)
    np.matmul(wide, matrix, out=product)
    np.copyto(out, product, casting="same_kind")


def _encode_rotate_into(
    x: np.ndarray, rotation: Rotation, transposed: np.ndarray | None, out: np.ndarray
) -> None:
    """out = x @ Pi.T for an encode: the Hadamard FWHT, or the float64 product with ``transposed``
    (Pi.T as float64) rounded to float32 (see the module docstring)."""
    if transposed is None:
        _rotate_into(x, rotation, out)
    else:
        _exact_product_into(x, transposed, out)


def _encode_matrix(rotation: Rotation) -> np.ndarray | None:
    """Pi.T as float64 for :func:`_encode_rotate_into` (None for Hadamard)."""
    return None if rotation.kind == "hadamard" else rotation.matrix.T.astype(np.float64)


def _unrotate_into(y: np.ndarray, rotation: Rotation, out: np.ndarray) -> None:
    """out = y @ Pi for float32 [n, d] arrays."""
    if rotation.kind == "hadamard":
        ones = np.ones(rotation.dim, np.float32)
        scale = np.float32(1 / math.sqrt(rotation.dim))
        _hadamard_kernel(rotation.dim)(y, ones, rotation.signs, scale, out)
    else:
        np.matmul(y, rotation.matrix, out=out)


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


@functools.lru_cache(maxsize=256)
def _codebook_f32(codebook: Codebook) -> tuple[np.ndarray, np.ndarray]:
    """The codebook's edges and centroids as float32 (converted once per codebook)."""
    return _f32(codebook.edges), _f32(codebook.centroids)


def _scales(norms: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, np.float32) if norms is None else _f32(norms)


def _rotated(x: np.ndarray, rotation: Rotation) -> np.ndarray:
    """x @ Pi.T for a small array (queries)."""
    out = np.empty((x.shape[0], rotation.dim), np.float32)
    _rotate_into(_f32(x), rotation, out)
    return out


# ---------------------------------------------------------------------------------------------
# The backend contract (see tq.kernels.naive)


def mse_encode(
    x: np.ndarray, rotation: Rotation, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    kernels = row_kernels(codebook.bits)
    n, dim = x.shape
    x = _f32(x)
    edges, _ = _codebook_f32(codebook)
    codes = np.empty((n, code_bytes(dim, codebook.bits)), np.uint8)
    norms = np.empty(n, np.float32)
    transposed = _encode_matrix(rotation)

    def work(start: int, stop: int) -> None:
        rotated = np.empty((stop - start, dim), np.float32)
        _encode_rotate_into(x[start:stop], rotation, transposed, rotated)
        kernels.encode_rows(rotated, edges, normalize, codes[start:stop], norms[start:stop])

    run_chunks(n, work)
    return codes, norms


def mse_decode(
    codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    kernels = row_kernels(codebook.bits)
    n, dim = codes.shape[0], rotation.dim
    _, centroids = _codebook_f32(codebook)
    scales = _scales(norms, n)
    out = np.empty((n, dim), np.float32)

    def work(start: int, stop: int) -> None:
        looked_up = np.empty((stop - start, dim), np.float32)
        kernels.lookup_rows(codes[start:stop], centroids, scales[start:stop], looked_up)
        _unrotate_into(looked_up, rotation, out[start:stop])

    run_chunks(n, work)
    return out


def _luts(rotated_queries: np.ndarray, codebook: Codebook) -> np.ndarray:
    """Per-query tables lut[q, j, k] = (Pi q)_j * c_k, float32 [m, d, 2^b]."""
    return _f32(rotated_queries[:, :, None] * _codebook_f32(codebook)[1][None, None, :])


def mse_scores(
    queries: np.ndarray, codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    kernels = row_kernels(codebook.bits)
    n = codes.shape[0]
    out = np.empty((queries.shape[0], n), np.float32)
    luts = _luts(_rotated(queries, rotation), codebook)
    scales = _scales(norms, n)
    run_chunks(
        n,
        lambda start, stop: kernels.lut_scores(
            luts, codes[start:stop], scales[start:stop], out[:, start:stop]
        ),
    )
    return out


def qjl_projection(rotation: Rotation, qjl: np.ndarray) -> np.ndarray:
    """S Pi^T, float32 [d, d]: S r = (S Pi^T)(Pi r) keeps the residual in the rotated domain."""
    return _f32(qjl.astype(np.float64) @ rotation.matrix.T.astype(np.float64))


def prod_encode(
    x: np.ndarray, rotation: Rotation, qjl: np.ndarray, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    kernels = row_kernels(codebook.bits)
    n, dim = x.shape
    x = _f32(x)
    edges, centroids = _codebook_f32(codebook)
    projection_t = qjl_projection(rotation, qjl).T.astype(np.float64)
    transposed = _encode_matrix(rotation)
    codes = np.empty((n, code_bytes(dim, codebook.bits)), np.uint8)
    signs = np.empty((n, code_bytes(dim, 1)), np.uint8)
    norms = np.empty(n, np.float32)
    gammas = np.empty(n, np.float32)

    def work(start: int, stop: int) -> None:
        rotated = np.empty((stop - start, dim), np.float32)
        residual = np.empty_like(rotated)
        _encode_rotate_into(x[start:stop], rotation, transposed, rotated)
        kernels.encode_rows_residual(
            rotated,
            edges,
            centroids,
            normalize,
            codes[start:stop],
            norms[start:stop],
            residual,
            gammas[start:stop],
        )
        _exact_product_into(residual, projection_t, rotated)  # only the signs are kept
        _pack_sign_rows(rotated, signs[start:stop])

    run_chunks(n, work)
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
    kernels = row_kernels(codebook.bits)
    n, dim = codes.shape[0], rotation.dim
    _, centroids = _codebook_f32(codebook)
    scales = _scales(norms, n)
    weights = _f32(qjl_scale(dim) * gammas * scales)
    # x~ = [c[idx] s, w sign] @ [Pi; S]: one [n, 2d] x [2d, d] product (Haar), or the inverse
    # Walsh-Hadamard transform of the first half plus (w sign) @ S.
    stacked_matrix = np.concatenate([rotation.matrix, _f32(qjl)])
    out = np.empty((n, dim), np.float32)

    def work(start: int, stop: int) -> None:
        stacked = np.empty((stop - start, 2 * dim), np.float32)
        kernels.lookup_rows(codes[start:stop], centroids, scales[start:stop], stacked[:, :dim])
        _signs_to_rows(signs[start:stop], weights[start:stop], stacked[:, dim:])
        if rotation.kind == "hadamard":
            _unrotate_into(stacked[:, :dim], rotation, out[start:stop])
            out[start:stop] += stacked[:, dim:] @ stacked_matrix[dim:]
        else:
            np.matmul(stacked, stacked_matrix, out=out[start:stop])

    run_chunks(n, work)
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
    kernels = row_kernels(codebook.bits)
    queries = _f32(queries)
    n = codes.shape[0]
    scales = _scales(norms, n)
    out = np.empty((queries.shape[0], n), np.float32)
    luts = _luts(_rotated(queries, rotation), codebook)
    weights = _f32(qjl_scale(rotation.dim) * gammas * scales)
    projected = _f32(queries @ _f32(qjl).T)

    def work(start: int, stop: int) -> None:
        part = out[:, start:stop]
        kernels.lut_scores(luts, codes[start:stop], scales[start:stop], part)
        add_sign_scores(projected, signs[start:stop], weights[start:stop], part)

    run_chunks(n, work)
    return out

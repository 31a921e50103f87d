"""Numba CPU kernels: the default backend, tested against :mod:`tq.kernels.reference`.

Same functions, arguments and results as the reference (see its docstring for shapes). Each
encode is one rotation followed by one fused, parallel Numba pass over the rows (normalize,
quantize, pack); each decode is one fused pass (unpack, centroid look-up, scale) followed by
one inverse rotation. The Haar rotation is a float32 matrix product through NumPy's BLAS (the
fastest dense product on the machine); the Hadamard rotation is a Numba fast Walsh-Hadamard
transform. Inner products never reconstruct x: each query is rotated once and turned into a
look-up table lut[j, k] = (Pi q)_j * c_k that the packed codes index.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from tq.codebook import Codebook
from tq.kernels.reference import qjl_scale
from tq.packing import code_bytes
from tq.rotation import Rotation

_FASTMATH = {"contract", "reassoc"}  # vectorize sums; keep NaN and inf semantics
_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)
_pjit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, parallel=True)

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
# Parallel passes


@_pjit
def _encode_rows(y, edges, bits, normalize, codes, norms):
    """Per row of rotated y float32 [n, d]: norm, scale, quantize, pack."""
    n, dim = y.shape
    for i in numba.prange(n):
        indices = np.empty(dim, np.int32)
        norm = _row_norm(y[i])
        norms[i] = norm
        scale = np.float32(1.0 / norm) if normalize and norm > 0 else np.float32(1.0)
        _quantize_row(y[i], scale, edges, bits, indices)
        _pack_row(indices, bits, codes[i])


@_pjit
def _encode_rows_residual(y, edges, centroids, bits, normalize, codes, norms, residual, gammas):
    """As _encode_rows, and also the rotated residual y/|y| - c[idx] and its norm gamma."""
    n, dim = y.shape
    for i in numba.prange(n):
        indices = np.empty(dim, np.int32)
        norm = _row_norm(y[i])
        norms[i] = norm
        scale = np.float32(1.0 / norm) if normalize and norm > 0 else np.float32(1.0)
        _quantize_row(y[i], scale, edges, bits, indices)
        _pack_row(indices, bits, codes[i])
        for j in range(dim):
            residual[i, j] = y[i, j] * scale - centroids[indices[j]]
        gammas[i] = _row_norm(residual[i])


@_pjit
def _pack_sign_rows(projected, signs):
    """signs[i] = packed (projected[i] >= 0), one bit per coordinate."""
    n, dim = projected.shape
    for i in numba.prange(n):
        positive = np.empty(dim, np.int32)
        for j in range(dim):
            positive[j] = projected[i, j] >= 0
        _pack_row(positive, 1, signs[i])


@_pjit
def _lookup_rows(codes, centroids, bits, scales, out):
    """out[i, j] = centroids[idx_ij] * scales[i] for out float32 [n, d]."""
    n, dim = out.shape
    for i in numba.prange(n):
        indices = np.empty(dim, np.int32)
        _unpack_row(codes[i], bits, indices)
        for j in range(dim):
            out[i, j] = centroids[indices[j]] * scales[i]


@_pjit
def _lookup_prod_rows(codes, signs, centroids, bits, scales, qjl_weights, out):
    """out[i] = [c[idx_i] * s_i, w_i * sign_i] for out float32 [n, 2d] (one product decodes)."""
    n = out.shape[0]
    dim = out.shape[1] // 2
    for i in numba.prange(n):
        indices = np.empty(dim, np.int32)
        _unpack_row(codes[i], bits, indices)
        for j in range(dim):
            out[i, j] = centroids[indices[j]] * scales[i]
        _unpack_row(signs[i], 1, indices)
        for j in range(dim):
            out[i, dim + j] = qjl_weights[i] * np.float32(2 * indices[j] - 1)


@_pjit
def _lut_scores(luts, codes, bits, scales, out):
    """out[q, i] = scales[i] * sum_j luts[q, j, idx_ij]; luts float32 [m, d, 2^bits]."""
    m, dim, _ = luts.shape
    n = codes.shape[0]
    for i in numba.prange(n):
        indices = np.empty(dim, np.int32)
        _unpack_row(codes[i], bits, indices)
        for q in range(m):
            total = np.float32(0.0)
            for j in range(dim):
                total += luts[q, j, indices[j]]
            out[q, i] = total * scales[i]


@_pjit
def _add_sign_scores(projected_queries, signs, weights, out):
    """out[q, i] += weights[i] * <projected_queries[q], sign_i>, sign_i in {-1, +1}^d."""
    m, dim = projected_queries.shape
    n = signs.shape[0]
    for i in numba.prange(n):
        indices = np.empty(dim, np.int32)
        _unpack_row(signs[i], 1, indices)
        for q in range(m):
            total = np.float32(0.0)
            for j in range(dim):
                total += projected_queries[q, j] * np.float32(2 * indices[j] - 1)
            out[q, i] += weights[i] * total


@_pjit
def _fwht_rows(x, signs_before, scale, signs_after, out):
    """out[i] = signs_after * H (signs_before * x[i]) * scale; H the Sylvester Hadamard matrix."""
    n, dim = x.shape
    for i in numba.prange(n):
        row = out[i]
        for j in range(dim):
            row[j] = x[i, j] * signs_before[j]
        half = 1
        while half < dim:
            for start in range(0, dim, 2 * half):
                for j in range(start, start + half):
                    a = row[j]
                    b = row[j + half]
                    row[j] = a + b
                    row[j + half] = a - b
            half *= 2
        for j in range(dim):
            row[j] *= scale * signs_after[j]


# ---------------------------------------------------------------------------------------------
# Rotations


def _rotate(x: np.ndarray, rotation: Rotation) -> np.ndarray:
    """y = x @ Pi.T, float32 [n, d]."""
    if rotation.kind == "hadamard":
        out = np.empty_like(x)
        ones = np.ones(rotation.dim, np.float32)
        _fwht_rows(x, rotation.signs, np.float32(1 / math.sqrt(rotation.dim)), ones, out)
        return out
    return x @ rotation.matrix.T


def _unrotate(y: np.ndarray, rotation: Rotation) -> np.ndarray:
    """x = y @ Pi, float32 [n, d]."""
    if rotation.kind == "hadamard":
        out = np.empty_like(y)
        ones = np.ones(rotation.dim, np.float32)
        _fwht_rows(y, ones, np.float32(1 / math.sqrt(rotation.dim)), rotation.signs, out)
        return out
    return y @ rotation.matrix


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _scales(norms: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, np.float32) if norms is None else _f32(norms)


# ---------------------------------------------------------------------------------------------
# The backend contract (see tq.kernels.reference)


def mse_encode(
    x: np.ndarray, rotation: Rotation, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    n, dim = x.shape
    codes = np.empty((n, code_bytes(dim, codebook.bits)), np.uint8)
    norms = np.empty(n, np.float32)
    _encode_rows(_rotate(_f32(x), rotation), _f32(codebook.edges), codebook.bits, normalize, codes, norms)
    return codes, norms


def mse_decode(
    codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    n = codes.shape[0]
    y = np.empty((n, rotation.dim), np.float32)
    _lookup_rows(codes, _f32(codebook.centroids), codebook.bits, _scales(norms, n), y)
    return _unrotate(y, rotation)


def _luts(rotated_queries: np.ndarray, codebook: Codebook) -> np.ndarray:
    """Per-query tables lut[q, j, k] = (Pi q)_j * c_k, float32 [m, d, 2^b]."""
    return _f32(rotated_queries[:, :, None] * _f32(codebook.centroids)[None, None, :])


def mse_scores(
    queries: np.ndarray, codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    n = codes.shape[0]
    out = np.empty((queries.shape[0], n), np.float32)
    luts = _luts(_rotate(_f32(queries), rotation), codebook)
    _lut_scores(luts, codes, codebook.bits, _scales(norms, n), out)
    return out


def prod_encode(
    x: np.ndarray, rotation: Rotation, qjl: np.ndarray, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n, dim = x.shape
    codes = np.empty((n, code_bytes(dim, codebook.bits)), np.uint8)
    signs = np.empty((n, code_bytes(dim, 1)), np.uint8)
    norms = np.empty(n, np.float32)
    gammas = np.empty(n, np.float32)
    residual = np.empty((n, dim), np.float32)
    _encode_rows_residual(
        _rotate(_f32(x), rotation),
        _f32(codebook.edges),
        _f32(codebook.centroids),
        codebook.bits,
        normalize,
        codes,
        norms,
        residual,
        gammas,
    )
    # S r = (S Pi^T)(y/|y| - c): the residual stays in the rotated domain.
    projection = _f32(qjl.astype(np.float64) @ rotation.matrix.T.astype(np.float64))
    _pack_sign_rows(residual @ projection.T, signs)
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
    scales = _scales(norms, n)
    stacked = np.empty((n, 2 * dim), np.float32)
    weights = _f32(qjl_scale(dim) * gammas * scales)
    _lookup_prod_rows(codes, signs, _f32(codebook.centroids), codebook.bits, scales, weights, stacked)
    # x~ = c[idx] Pi + w sign S, with the Haar product done as one [n, 2d] x [2d, d] product.
    if rotation.kind == "hadamard":
        return _unrotate(stacked[:, :dim], rotation) + stacked[:, dim:] @ _f32(qjl)
    return stacked @ np.concatenate([rotation.matrix, _f32(qjl)])


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
    _lut_scores(_luts(_rotate(queries, rotation), codebook), codes, codebook.bits, scales, out)
    weights = _f32(qjl_scale(rotation.dim) * gammas * scales)
    _add_sign_scores(_f32(queries @ _f32(qjl).T), signs, weights, out)
    return out

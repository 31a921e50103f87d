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

The kernels, one module per concept:

- :mod:`tq.kernels.cuda_device`: whether a GPU runs them, arrays in and out, launch constants;
- :mod:`tq.kernels.cuda_geometry`: the row tile (rows of d coordinates on a block of 128 threads);
- :mod:`tq.kernels.cuda_codec`: encode (MSE, and Prod in the same kernel), decode and rotation
  kernels, with their device functions (Walsh-Hadamard butterflies, the in-place matmul);
- :mod:`tq.kernels.cuda_scores`: inner products straight from the packed codes.

This module launches them. Per-quantizer constants (padded rotation matrices, Hadamard signs, S,
S Pi^T, codebook edges and centroids) are uploaded once and cached, keyed by the identity of the
NumPy arrays they come from (evicted when those arrays are freed; the arrays must not be
modified in place).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from numba import cuda

from tq.core.codebook import Codebook
from tq.core.packing import code_bytes
from tq.core.rotation import Rotation
from tq.kernels import is_gpu_array
from tq.kernels.cuda_codec import decode_kernel, encode_kernel, transform_kernel
from tq.kernels.cuda_device import (
    THREADS,
    available,
    check_shape,
    placeholder,
    results,
    rows_of,
    simulated,
    to_device_bytes,
    to_device_floats,
)
from tq.kernels.cuda_geometry import geometry, tile_blocks
from tq.kernels.cuda_scores import query_tile_size, scores_kernel

__all__ = [
    "available",
    "mse_decode",
    "mse_encode",
    "mse_scores",
    "prod_decode",
    "prod_encode",
    "prod_scores",
    "simulated",
]

# ---------------------------------------------------------------------------------------------
# The per-quantizer constants on the device

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
    padded = np.zeros((geometry(dim).padded,) * 2, np.float32)
    padded[:dim, :dim] = matrix
    return cuda.to_device(padded)


def _rotation_constants(rotation: Rotation) -> SimpleNamespace:
    """forward Pi^T, inverse Pi (Haar) and the signs (Hadamard), on the device."""

    def build() -> SimpleNamespace:
        if rotation.kind == "hadamard":
            matrix = placeholder(np.float32, 2)
            return SimpleNamespace(forward=matrix, inverse=matrix, signs=_upload(rotation.signs))
        return SimpleNamespace(
            forward=_upload_padded(rotation.matrix.T),
            inverse=_upload_padded(rotation.matrix),
            signs=placeholder(np.float32, 1),
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


# ---------------------------------------------------------------------------------------------
# Launches


def _optional_floats(array: Any, n: int, name: str) -> Any:
    """float32 [n] on the device, or a placeholder for None."""
    if array is None:
        return placeholder(np.float32, 1)
    device = to_device_floats(array, name)
    check_shape(device, (n,), name)
    return device


def _rotate_queries(queries: Any, rotation: Rotation, matrix: Any | None = None) -> Any:
    """queries @ Pi^T (or @ matrix, a zero-padded [padded, padded] device array) -> float32 [m, d]."""
    dim = rotation.dim
    m = queries.shape[0]
    out = cuda.device_array((m, dim), np.float32)
    if matrix is None:
        constants = _rotation_constants(rotation)
        kernel = transform_kernel(dim, rotation.kind == "hadamard")
        kernel[tile_blocks(m, dim), THREADS](queries, constants.forward, constants.signs, out)
    else:
        kernel = transform_kernel(dim, False)
        kernel[tile_blocks(m, dim), THREADS](queries, matrix, placeholder(np.float32, 1), out)
    return out


# ---------------------------------------------------------------------------------------------
# The backend contract (see tq.kernels.naive)


def mse_encode(x: Any, rotation: Rotation, codebook: Codebook, normalize: bool) -> tuple[Any, Any]:
    """Rotate, quantize, pack -> (codes uint8 [n, ceil(d*b/8)], norms float32 [n])."""
    on_device = is_gpu_array(x)
    x = to_device_floats(x, "x")
    dim, bits = rotation.dim, codebook.bits
    n = rows_of(x, dim, "x")
    codes = cuda.device_array((n, code_bytes(dim, bits)), np.uint8)
    norms = cuda.device_array(n, np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = encode_kernel(dim, bits, rotation.kind == "hadamard", bool(normalize), False)
        kernel[tile_blocks(n, dim), THREADS](
            x,
            rot.forward,
            rot.signs,
            placeholder(np.float32, 2),
            book.edges,
            book.centroids,
            codes,
            norms,
            placeholder(np.uint8, 2),
            placeholder(np.float32, 1),
        )
    return results(on_device, codes, norms)


def mse_decode(codes: Any, norms: Any | None, rotation: Rotation, codebook: Codebook) -> Any:
    """Unpack, look up centroids, rotate back, scale by norms -> float32 [n, d]."""
    on_device = is_gpu_array(codes)
    codes = to_device_bytes(codes, "codes")
    dim, bits = rotation.dim, codebook.bits
    n = rows_of(codes, code_bytes(dim, bits), "codes")
    norms_d = _optional_floats(norms, n, "norms")
    out = cuda.device_array((n, dim), np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = decode_kernel(dim, bits, rotation.kind == "hadamard", norms is not None, False)
        kernel[tile_blocks(n, dim), THREADS](
            codes,
            norms_d,
            placeholder(np.uint8, 2),
            placeholder(np.float32, 1),
            rot.inverse,
            rot.signs,
            placeholder(np.float32, 2),
            book.centroids,
            out,
        )
    return results(on_device, out)


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
    queries = to_device_floats(queries, "queries")
    dim, bits = rotation.dim, codebook.bits
    m = rows_of(queries, dim, "queries")
    codes = to_device_bytes(codes, "codes")
    n = rows_of(codes, code_bytes(dim, bits), "codes")
    prod = qjl is not None
    norms_d = _optional_floats(norms, n, "norms")
    gammas_d = _optional_floats(gammas, n, "gammas")
    if prod:
        signs = to_device_bytes(signs, "signs")
        check_shape(signs, (n, code_bytes(dim, 1)), "signs")
    else:
        signs = placeholder(np.uint8, 2)
    out = cuda.device_array((m, n), np.float32)
    if m and n:
        rotated = _rotate_queries(queries, rotation)
        projected = (
            _rotate_queries(queries, rotation, _qjl_constants(rotation, qjl).transposed)
            if prod
            else placeholder(np.float32, 2)
        )
        book = _codebook_constants(codebook)
        query_tile = query_tile_size(dim, m)
        query_blocks = min(-(-m // query_tile), 65535)
        kernel = scores_kernel(dim, bits, norms is not None, prod, query_tile)
        kernel[((n + THREADS - 1) // THREADS, query_blocks), THREADS](
            rotated, projected, codes, signs, norms_d, gammas_d, book.centroids, out
        )
    return results(on_device, out)


def mse_scores(queries: Any, codes: Any, norms: Any | None, rotation: Rotation, codebook: Codebook) -> Any:
    """Estimates of <q_i, x_j> from the codes: <Pi q_i, c[idx_j]> |x_j| -> float32 [m, n]."""
    return _launch_scores(queries, codes, None, None, norms, rotation, None, codebook)


def prod_encode(
    x: Any, rotation: Rotation, qjl: np.ndarray, codebook: Codebook, normalize: bool
) -> tuple[Any, Any, Any, Any]:
    """Algorithm 2 in one kernel -> (codes, signs uint8 [n, ceil(d/8)], gammas, norms float32 [n])."""
    on_device = is_gpu_array(x)
    x = to_device_floats(x, "x")
    dim, bits = rotation.dim, codebook.bits
    n = rows_of(x, dim, "x")
    codes = cuda.device_array((n, code_bytes(dim, bits)), np.uint8)
    signs = cuda.device_array((n, code_bytes(dim, 1)), np.uint8)
    gammas = cuda.device_array(n, np.float32)
    norms = cuda.device_array(n, np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = encode_kernel(dim, bits, rotation.kind == "hadamard", bool(normalize), True)
        kernel[tile_blocks(n, dim), THREADS](
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
    return results(on_device, codes, signs, gammas, norms)


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
    codes = to_device_bytes(codes, "codes")
    dim, bits = rotation.dim, codebook.bits
    n = rows_of(codes, code_bytes(dim, bits), "codes")
    signs = to_device_bytes(signs, "signs")
    check_shape(signs, (n, code_bytes(dim, 1)), "signs")
    gammas_d = _optional_floats(gammas, n, "gammas")
    norms_d = _optional_floats(norms, n, "norms")
    out = cuda.device_array((n, dim), np.float32)
    if n:
        rot = _rotation_constants(rotation)
        book = _codebook_constants(codebook)
        kernel = decode_kernel(dim, bits, rotation.kind == "hadamard", norms is not None, True)
        kernel[tile_blocks(n, dim), THREADS](
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
    return results(on_device, out)


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

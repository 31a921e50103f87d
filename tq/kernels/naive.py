"""The NumPy oracle: slow, obviously correct versions of every kernel, in float64.

Shapes: x and queries are float32 [n, d] / [m, d]; ``codes`` uint8 [n, ceil(d*b/8)] (layout in
:mod:`tq.core.packing`); ``signs`` uint8 [n, ceil(d/8)]; ``norms`` and ``gammas`` float32 [n].
A rotation Pi maps a row x to y = x @ Pi.T. With ``normalize`` the kernels quantize x / |x|
(zero rows stay zero) and return the norms; without it they quantize x as given and still
return the norms so that callers can check the unit-norm contract.
Ties: a coordinate exactly on a cell edge goes to the lower cell (``searchsorted`` left).
"""

from __future__ import annotations

import numpy as np

from tq.core.codebook import Codebook
from tq.core.packing import pack_codes, pack_signs, unpack_codes, unpack_signs
from tq.core.rotation import Rotation


def qjl_scale(dim: int) -> float:
    """The Prod dequantizer's constant sqrt(pi/2) / d for a Gaussian S."""
    return float(np.sqrt(np.pi / 2) / dim)


def _rotated_units(x: np.ndarray, rotation: Rotation, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    norms = np.sqrt(np.sum(x64 * x64, axis=1))
    if normalize:
        x64 = x64 / np.where(norms > 0, norms, 1.0)[:, None]
    return x64 @ rotation.matrix.T.astype(np.float64), norms.astype(np.float32)


def _scale_rows(values: np.ndarray, norms: np.ndarray | None) -> np.ndarray:
    return values if norms is None else values * norms.astype(np.float64)[:, None]


def mse_encode(
    x: np.ndarray, rotation: Rotation, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate, quantize each coordinate to its nearest centroid, pack -> (codes, norms)."""
    y, norms = _rotated_units(x, rotation, normalize)
    indices = np.searchsorted(codebook.edges, y, side="left").astype(np.uint8)
    return pack_codes(indices, codebook.bits), norms


def mse_decode(
    codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    """Unpack, look up centroids, rotate back, scale by norms -> float32 [n, d]."""
    y = codebook.centroids[unpack_codes(codes, rotation.dim, codebook.bits)]
    return _scale_rows(y @ rotation.matrix.astype(np.float64), norms).astype(np.float32)


def mse_scores(
    queries: np.ndarray, codes: np.ndarray, norms: np.ndarray | None, rotation: Rotation, codebook: Codebook
) -> np.ndarray:
    """Estimates of <q_i, x_j> from the codes: <Pi q_i, c[idx_j]> |x_j| -> float32 [m, n]."""
    rotated_queries = queries.astype(np.float64) @ rotation.matrix.T.astype(np.float64)
    y = codebook.centroids[unpack_codes(codes, rotation.dim, codebook.bits)]
    return _scale_rows(y @ rotated_queries.T, norms).T.astype(np.float32)


def prod_encode(
    x: np.ndarray, rotation: Rotation, qjl: np.ndarray, codebook: Codebook, normalize: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Algorithm 2: MSE codes at b-1 bits, then signs of S r for the residual r.

    Returns (codes, signs, gammas, norms); gamma = |r| and sign(0) counts as +1.
    """
    y, norms = _rotated_units(x, rotation, normalize)
    indices = np.searchsorted(codebook.edges, y, side="left")
    residual = (y - codebook.centroids[indices]) @ rotation.matrix.astype(np.float64)
    gammas = np.sqrt(np.sum(residual * residual, axis=1)).astype(np.float32)
    positive = residual @ qjl.T.astype(np.float64) >= 0
    return pack_codes(indices.astype(np.uint8), codebook.bits), pack_signs(positive), gammas, norms


def prod_decode(
    codes: np.ndarray,
    signs: np.ndarray,
    gammas: np.ndarray,
    norms: np.ndarray | None,
    rotation: Rotation,
    qjl: np.ndarray,
    codebook: Codebook,
) -> np.ndarray:
    """x~ = Pi^T c[idx] + sqrt(pi/2)/d * gamma * S^T sign, scaled by norms -> float32 [n, d]."""
    dim = rotation.dim
    mse = codebook.centroids[unpack_codes(codes, dim, codebook.bits)] @ rotation.matrix.astype(np.float64)
    correction = unpack_signs(signs, dim).astype(np.float64) @ qjl.astype(np.float64)
    x = mse + qjl_scale(dim) * gammas.astype(np.float64)[:, None] * correction
    return _scale_rows(x, norms).astype(np.float32)


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
    """Unbiased estimates of <q_i, x_j>: <Pi q, c[idx]> + sqrt(pi/2)/d gamma <S q, sign>."""
    dim = rotation.dim
    q64 = queries.astype(np.float64)
    y = codebook.centroids[unpack_codes(codes, dim, codebook.bits)]
    mse = y @ (q64 @ rotation.matrix.T.astype(np.float64)).T
    qjl_part = unpack_signs(signs, dim).astype(np.float64) @ (q64 @ qjl.T.astype(np.float64)).T
    total = mse + qjl_scale(dim) * gammas.astype(np.float64)[:, None] * qjl_part
    return _scale_rows(total, norms).T.astype(np.float32)

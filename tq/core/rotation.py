"""Seeded random rotations: Haar-distributed orthogonal matrices and randomized Hadamard.

A rotation is applied to row vectors as ``y = x @ matrix.T`` (y = Pi x) and undone with
``x = y @ matrix``. Random numbers come from NumPy's PCG64 seeded with (seed, stream), so the
same seed gives the same matrix on every run and machine; the matrix is computed in float64 and
stored in float32, which hides last-bit differences between LAPACK builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROTATION_KINDS = ("haar", "hadamard")

# Independent random streams drawn from one user seed.
ROTATION_STREAM = 0
QJL_STREAM = 1
_TQ_SPAWN_KEY = 0x7471  # "tq"


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    """A PCG64 generator for (seed, stream): the same numbers on every platform."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # The spawn key keeps these streams apart from np.random.default_rng(seed): a plain
    # SeedSequence([seed, 0]) equals SeedSequence(seed) (the pool is zero-padded), which made
    # the rotation for seed 0 correlated with data drawn from default_rng(0).
    sequence = np.random.SeedSequence(int(seed), spawn_key=(_TQ_SPAWN_KEY, stream))
    return np.random.Generator(np.random.PCG64(sequence))


@dataclass(frozen=True)
class Rotation:
    """A d x d orthogonal matrix Pi and how it was made.

    Attributes:
        kind: "haar" or "hadamard".
        matrix: float32 [d, d], orthogonal; y = Pi x.
        signs: float32 [d] of +-1 for "hadamard" (Pi = H diag(signs) / sqrt(d)), else None.
    """

    kind: str
    matrix: np.ndarray
    signs: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]


def haar_matrix(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed orthogonal matrix, float64 [dim, dim].

    Q of the QR decomposition of a standard Gaussian matrix, with each column's sign flipped so
    that R has a positive diagonal; without the fix Q is not Haar distributed.
    """
    gaussian = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def hadamard_matrix(dim: int) -> np.ndarray:
    """The Sylvester Hadamard matrix H (entries +-1), float64 [dim, dim]; dim a power of two."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two dimension, got {dim}")
    h = np.ones((1, 1))
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    return h


def make_rotation(dim: int, seed: int, kind: str = "haar") -> Rotation:
    """The rotation of the given kind for (dim, seed)."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    rng = seeded_rng(seed, ROTATION_STREAM)
    if kind == "haar":
        return Rotation("haar", haar_matrix(dim, rng).astype(np.float32))
    if kind == "hadamard":
        signs = np.where(rng.random(dim) < 0.5, -1.0, 1.0)
        matrix = hadamard_matrix(dim) * signs / np.sqrt(dim)
        return Rotation("hadamard", matrix.astype(np.float32), signs.astype(np.float32))
    raise ValueError(f"rotation must be one of {ROTATION_KINDS}, got {kind!r}")


def qjl_matrix(dim: int, seed: int) -> np.ndarray:
    """The QJL projection S: i.i.d. N(0, 1) entries, float32 [dim, dim], not orthogonalized.

    The Prod dequantizer's constant sqrt(pi/2) / d holds for this Gaussian S only.
    """
    return seeded_rng(seed, QJL_STREAM).standard_normal((dim, dim)).astype(np.float32)

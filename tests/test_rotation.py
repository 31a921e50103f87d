"""Seeded rotations (Haar and randomized Hadamard) and the QJL matrix S."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.special import betainc

from tq.core.rotation import make_rotation, qjl_matrix

# The matrix is computed in float64 and rounded to float32 (relative error 2^-24 = 6e-8 per entry),
# so entries of Pi Pi^T - I are sums of d products each off by about 6e-8 / d: about 1e-7 in total.
ORTHOGONALITY_TOL = 1e-6
# Statistical checks accept a sample mean within Z_SCORE standard errors (estimated from the sample)
# of its exact expectation: a false failure has probability below 1e-6 for a normal mean.
Z_SCORE = 5.0
# The Kolmogorov-Smirnov check fails below this p-value (a false failure 1 time in 10^4 draws).
KS_P_VALUE = 1e-4


@pytest.mark.parametrize(
    ("kind", "dim"), [("haar", 2), ("haar", 3), ("haar", 100), ("hadamard", 2), ("hadamard", 128)]
)
def test_rotation_is_orthogonal_float32(kind, dim):
    rotation = make_rotation(dim, seed=3, kind=kind)
    assert rotation.kind == kind and rotation.dim == dim
    assert rotation.matrix.dtype == np.float32 and rotation.matrix.shape == (dim, dim)
    matrix = rotation.matrix.astype(np.float64)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(dim), rtol=0, atol=ORTHOGONALITY_TOL)


def test_hadamard_is_sylvester_times_random_signs():
    rotation = make_rotation(8, seed=5, kind="hadamard")
    assert rotation.signs.dtype == np.float32 and set(np.unique(rotation.signs)) <= {-1.0, 1.0}
    sylvester = np.array([[1.0]])
    while sylvester.shape[0] < 8:
        sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
    expected = sylvester * rotation.signs / np.sqrt(8)
    np.testing.assert_allclose(rotation.matrix, expected, rtol=1e-7)


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_same_seed_gives_identical_bytes_and_other_seeds_differ(kind):
    first, again, other = (make_rotation(64, seed, kind) for seed in (11, 11, 12))
    assert first.matrix.tobytes() == again.matrix.tobytes()
    assert not np.array_equal(first.matrix, other.matrix)


def test_qjl_matrix_is_seeded_and_differs_from_the_rotation_stream():
    s = qjl_matrix(64, seed=11)
    assert s.dtype == np.float32 and s.shape == (64, 64)
    assert s.tobytes() == qjl_matrix(64, seed=11).tobytes()
    assert not np.array_equal(s, qjl_matrix(64, seed=12))
    rotation_gaussian = np.random.Generator(np.random.PCG64(np.random.SeedSequence([11, 0])))
    assert not np.allclose(s, rotation_gaussian.standard_normal((64, 64)).astype(np.float32))


def test_qjl_matrix_is_gaussian_not_orthogonalized():
    # The Prod constant sqrt(pi/2) / d holds for i.i.d. N(0, 1) entries only. Entry variance is 1
    # (standard error sqrt(2 / d^2)); an orthogonalized S (S S^T = d I) would leave S S^T / d - I
    # at zero, while a Gaussian one has entries of size 1 / sqrt(d): Frobenius norm about sqrt(d).
    dim = 64
    s = qjl_matrix(dim, seed=0).astype(np.float64)
    entries = s.ravel()
    assert abs(entries.mean()) <= Z_SCORE * entries.std(ddof=1) / np.sqrt(entries.size)
    squares = entries**2
    assert abs(squares.mean() - 1) <= Z_SCORE * squares.std(ddof=1) / np.sqrt(squares.size)
    assert np.linalg.norm(s @ s.T / dim - np.eye(dim)) > 0.5 * np.sqrt(dim)


def test_haar_rotates_a_fixed_vector_to_a_uniform_direction():
    # Over seeds, y = Pi x for a fixed unit x is uniform on the sphere: y_0 has mean 0, variance
    # 1/d and the Lemma 1 density, P(|y_0| <= t) = I_{t^2}(1/2, (d-1)/2). Without the sign fix of
    # the QR, Pi[0, 0] (x = e_0 below) would always have the same sign.
    dim, samples = 8, 2000
    for x in (np.eye(dim)[0], np.full(dim, 1 / np.sqrt(dim))):
        y0 = np.array([make_rotation(dim, seed).matrix.astype(np.float64)[0] @ x for seed in range(samples)])
        assert abs(y0.mean()) <= Z_SCORE * y0.std(ddof=1) / np.sqrt(samples)
        squares = y0**2
        assert abs(squares.mean() - 1 / dim) <= Z_SCORE * squares.std(ddof=1) / np.sqrt(samples)

        def cdf(t):
            return 0.5 + 0.5 * np.sign(t) * betainc(0.5, (dim - 1) / 2, np.minimum(t * t, 1.0))

        assert stats.kstest(y0, cdf).pvalue > KS_P_VALUE


@pytest.mark.parametrize("dim", [3, 100, 96])
def test_hadamard_needs_a_power_of_two(dim):
    with pytest.raises(ValueError, match=f"power-of-two dimension, got {dim}"):
        make_rotation(dim, seed=0, kind="hadamard")


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match=r"rotation must be one of \('haar', 'hadamard'\), got 'givens'"):
        make_rotation(8, seed=0, kind="givens")


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True, None])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        make_rotation(8, seed=seed)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        qjl_matrix(8, seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_rotation_is_independent_of_numpy_default_rng_with_the_same_seed(seed):
    """Data drawn from np.random.default_rng(seed) must look random to the rotation for seed.

    Regression: SeedSequence([seed, 0]) equals SeedSequence(seed), so the rotation once reused
    the data's Gaussian stream and D_mse at 4 bits came out 15x too large.
    """
    x = np.random.default_rng(seed).standard_normal((64, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rotated = x @ make_rotation(64, seed).matrix.T.astype(np.float64)
    # A rotated coordinate of a unit vector is about N(0, 1/64): |y| > 0.6 is a 4.8-sigma event,
    # expected about 0.0000016 * 4096 = 0.007 times here; the correlated stream gave 0.8.
    assert np.abs(rotated).max() < 0.6

"""Lloyd-Max codebooks for the rotated-coordinate density (docs/design.md section 3)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import quad

from tq.core.codebook import coordinate_density, lloyd_max_codebook, solve_codebook
from tq.core.fileio import CacheWarning

# D_mse of the exact Lloyd-Max codebook at d = 64 and in the Gaussian limit (docs/design.md section 3).
D_MSE_D64 = {1: 0.3584, 2: 0.1145, 3: 0.0334, 4: 0.0091}
D_MSE_GAUSSIAN = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}
# Both tables are rounded to 4 decimals, so the exact value is within half a unit of the last place.
TABLE_ROUNDING = 5e-5
# D(d) approaches the Gaussian limit from below with a gap of about 0.8 D / d (the d = 64 table
# sits 0.0050 below 0.3634 at b = 1); at d = 4096 we allow 2 D / d on top of the rounding.
LIMIT_GAP_PER_DIM = 2.0
# scipy.integrate.quad is accurate to about 1e-12 on these smooth integrands (it reports its own
# error estimate); the solver stops when Lloyd steps move the centroids by less than 1e-13.
QUAD_TOL = 1e-9
# sqrt(3) pi / 2: the paper's upper bound on D_mse * 4^b (Panter-Dite constant of the Gaussian).
UPPER_BOUND_CONSTANT = np.sqrt(3) * np.pi / 2


def density(x: float, dim: int) -> float:
    return float(coordinate_density(np.array([x]), dim)[0])


def cells(codebook) -> list[tuple[float, float]]:
    bounds = np.concatenate([[-1.0], codebook.edges, [1.0]])
    return list(itertools.pairwise(bounds))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_is_the_exact_lloyd_max_value_at_d64(bits):
    assert lloyd_max_codebook(64, bits).distortion == pytest.approx(D_MSE_D64[bits], abs=TABLE_ROUNDING)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_approaches_the_gaussian_limit_from_below(bits):
    limit = D_MSE_GAUSSIAN[bits]
    d64, d128, d4096 = (lloyd_max_codebook(dim, bits).distortion for dim in (64, 128, 4096))
    assert d64 < d128 < d4096 < limit + TABLE_ROUNDING
    assert d4096 == pytest.approx(limit, abs=TABLE_ROUNDING + LIMIT_GAP_PER_DIM * limit / 4096)


@pytest.mark.parametrize("bits", range(1, 9))
def test_d3_is_the_uniform_density_so_distortion_is_4_to_the_minus_b(bits):
    # At d = 3 the coordinate density is uniform on [-1, 1]: Lloyd-Max is the uniform quantizer,
    # per-coordinate error (2 / 2^b)^2 / 12, so D = 3 * 4^-b / 3 = 4^-b.
    codebook = lloyd_max_codebook(3, bits)
    levels = 2**bits
    assert codebook.distortion == pytest.approx(4.0**-bits, rel=1e-9)
    np.testing.assert_allclose(codebook.centroids, -1 + (2 * np.arange(levels) + 1) / levels, atol=1e-10)


@pytest.mark.parametrize(
    ("dim", "bits"),
    [(2, 1), (2, 8), (3, 8), (7, 3), (64, 4), (100, 5), (128, 8), (4096, 1), (4096, 8)],
)
def test_centroids_are_symmetric_increasing_and_edges_are_midpoints(dim, bits):
    codebook = lloyd_max_codebook(dim, bits)
    centroids, edges = codebook.centroids, codebook.edges
    assert (codebook.dim, codebook.bits) == (dim, bits)
    assert centroids.shape == (2**bits,) and edges.shape == (2**bits - 1,)
    assert centroids.dtype == edges.dtype == np.float64
    assert np.all(np.diff(centroids) > 0)
    assert np.all(np.abs(centroids) < 1)
    np.testing.assert_array_equal(centroids, -centroids[::-1])
    np.testing.assert_allclose(edges, (centroids[:-1] + centroids[1:]) / 2, rtol=0, atol=1e-15)
    assert edges[2 ** (bits - 1) - 1] == 0.0
    assert 0 < codebook.distortion < 1


@pytest.mark.parametrize(("dim", "bits"), [(2, 2), (5, 2), (64, 3), (4096, 2)])
def test_each_centroid_is_the_conditional_mean_of_its_cell(dim, bits):
    codebook = lloyd_max_codebook(dim, bits)
    for centroid, (lo, hi) in zip(codebook.centroids, cells(codebook), strict=True):
        mass = quad(density, lo, hi, args=(dim,), limit=200)[0]
        moment = quad(lambda x: x * density(x, dim), lo, hi, limit=200)[0]
        assert moment / mass == pytest.approx(centroid, abs=QUAD_TOL)


@pytest.mark.parametrize(("dim", "bits"), [(5, 3), (64, 2)])
def test_distortion_is_d_times_the_per_coordinate_error(dim, bits):
    codebook = lloyd_max_codebook(dim, bits)
    error = sum(
        quad(lambda x, c=c: (x - c) ** 2 * density(x, dim), lo, hi, limit=200)[0]
        for c, (lo, hi) in zip(codebook.centroids, cells(codebook), strict=True)
    )
    assert dim * error == pytest.approx(codebook.distortion, abs=QUAD_TOL)


@pytest.mark.parametrize("dim", [2, 3, 5, 64, 4096])
def test_density_integrates_to_one_with_second_moment_one_over_d(dim):
    assert quad(density, -1, 1, args=(dim,), limit=200)[0] == pytest.approx(1.0, abs=QUAD_TOL)
    second = quad(lambda x: x * x * density(x, dim), -1, 1, limit=200)[0]
    assert second == pytest.approx(1.0 / dim, abs=QUAD_TOL)


@pytest.mark.parametrize("dim", [3, 4, 64, 4096])
@pytest.mark.parametrize("bits", range(1, 9))
def test_distortion_lies_between_the_paper_bounds(dim, bits):
    # The lower bound needs d >= 3 (equality at d = 3); at d = 2 the arcsine density piles up at
    # +-1 and a scalar quantizer beats 4^-b (D = 0.189 at b = 1).
    distortion = lloyd_max_codebook(dim, bits).distortion
    assert 4.0**-bits * (1 - 1e-12) <= distortion <= UPPER_BOUND_CONSTANT * 4.0**-bits


@given(dim=st.integers(2, 4096), bits=st.integers(1, 7))
def test_any_dim_and_bits_solve_to_a_valid_codebook(dim, bits):
    codebook, finer = solve_codebook(dim, bits), solve_codebook(dim, bits + 1)
    for book in (codebook, finer):
        assert np.all(np.diff(book.centroids) > 0) and np.all(np.abs(book.centroids) < 1)
        assert np.all(np.isfinite(book.centroids)) and 0 < book.distortion < 1
    assert finer.distortion < codebook.distortion
    if dim >= 3:
        assert codebook.distortion >= 4.0**-bits * (1 - 1e-12)


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    lloyd_max_codebook.cache_clear()
    solved = lloyd_max_codebook(37, 5)
    assert solved.iterations > 0
    assert (tmp_path / "codebooks" / "lloyd-max-d37-b5.json").is_file()

    lloyd_max_codebook.cache_clear()
    cached = lloyd_max_codebook(37, 5)
    assert cached.iterations == 0  # read from disk, not solved
    np.testing.assert_array_equal(cached.centroids, solved.centroids)
    np.testing.assert_array_equal(cached.edges, solved.edges)
    assert cached.distortion == solved.distortion
    lloyd_max_codebook.cache_clear()


def test_a_corrupt_disk_cache_entry_is_solved_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_CACHE_DIR", str(tmp_path))
    path = tmp_path / "codebooks" / "lloyd-max-d37-b5.json"
    path.parent.mkdir()
    path.write_text('{"format": "tq.codebook/1", "dim": 37, "bits": 5, "centroids": [0.5]')
    lloyd_max_codebook.cache_clear()
    with pytest.warns(CacheWarning, match=f"{path}: corrupt"):
        codebook = lloyd_max_codebook(37, 5)
    assert codebook.iterations > 0
    np.testing.assert_array_equal(codebook.centroids, solve_codebook(37, 5).centroids)
    lloyd_max_codebook.cache_clear()


@pytest.mark.parametrize(
    ("dim", "bits", "error", "match"),
    [
        (1, 2, ValueError, r"dim must be in \[2, 4096\], got 1"),
        (4097, 2, ValueError, r"dim must be in \[2, 4096\], got 4097"),
        (64, 0, ValueError, r"bits must be in \[1, 8\], got 0"),
        (64, 9, ValueError, r"bits must be in \[1, 8\], got 9"),
        (64.0, 2, TypeError, "dim must be an integer, got float"),
        (64, True, TypeError, "bits must be an integer, got bool"),
    ],
)
def test_bad_dim_or_bits_raise(dim, bits, error, match):
    with pytest.raises(error, match=match):
        lloyd_max_codebook(dim, bits)
    with pytest.raises(error, match=match):
        solve_codebook(dim, bits)

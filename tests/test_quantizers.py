"""TurboQuantMSE and TurboQuantProd through the public API: statistics, contracts and errors."""

from __future__ import annotations

import numpy as np
import pytest

from tq import BatchQuantizedMSE, TurboQuantMSE, TurboQuantProd, lloyd_max_codebook

# ---- tolerances -----------------------------------------------------------------------------
# Statistical checks accept a sample mean within Z_SCORE standard errors of its exact expectation,
# the standard error being estimated from the sample itself (std / sqrt(samples)). The samples are
# i.i.d. and their means close to normal, so a false failure has probability below 1e-6 per check.
Z_SCORE = 5.0
# D_mse at d = 64 (exact Lloyd-Max values, docs/design.md section 3), rounded to 4 decimals.
D_MSE_D64 = {1: 0.3584, 2: 0.1145, 3: 0.0334, 4: 0.0091}
TABLE_ROUNDING = 5e-5
# Vectors per D_mse check: ||x - x~||^2 of one vector has a relative spread of about 1/sqrt(d)
# at b = 1 (up to 2.5/sqrt(d) at b = 4), so 20000 vectors give a standard error of 0.1-0.25%.
MSE_VECTORS = 20_000
# D_prod holds in expectation over Pi and S: one seed alone is several percent off at d = 64. Each
# seed gives one i.i.d. sample (its mean over a fresh vectors x queries grid); per-seed means spread
# by about 5% at d = 64 (measured), so 100 seeds give a standard error of about 0.5%.
PROD_SEEDS, PROD_VECTORS, PROD_QUERIES = 100, 200, 200
# Unbiasedness: each seed gives one i.i.d. estimate of <y, x> for fixed (x, y); at d = 64, b = 2
# its standard deviation is about 0.09, so 300 seeds give a standard error of about 0.005.
BIAS_SEEDS = 300
# Rotating a reconstruction back (float32 Pi, so Pi^T Pi = I + O(1e-7) per entry) moves a centroid
# by about sqrt(d) * 1e-7 < 2e-6; a codebook solved for another density (the Gaussian limit
# N(0, 1/d)) differs from the exact one by at least 4e-5 in its outer centroids at d <= 128.
GRID_TOL = 1e-5
# Float agreement of two float32 computations of one inner product. A d-term float32 dot product is
# off by at most d * 2^-24 * |q| |x| (7.6e-6 at d = 128); the estimate and the reference each take a
# few such steps (rotate the query, project with S, the Prod correction c gamma <S q, sign> is at
# most 1.25 gamma |q|), so 1e-4 * |q| |x| leaves a margin of more than 10x for reordered sums.
FLOAT_TOL = 1e-4
# Powers of two scale every float operation exactly (away from overflow and underflow), so
# normalized batches of 2^k x must be exactly 2^k times those of x; 1e-6 allows one rounding.
EXACT_SCALE_RTOL = 1e-6

QUANTIZERS = [pytest.param(TurboQuantMSE, id="mse"), pytest.param(TurboQuantProd, id="prod")]


def assert_mean_close(samples: np.ndarray, expected: float) -> None:
    mean = float(np.mean(samples))
    standard_error = float(np.std(samples, ddof=1) / np.sqrt(len(samples)))
    assert abs(mean - expected) <= Z_SCORE * standard_error, (
        f"mean {mean:.6g} is {(mean - expected) / standard_error:+.1f} standard errors "
        f"({standard_error:.3g}) from the expected {expected:.6g}"
    )


# ---- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_measured_mse_distortion_is_the_codebook_distortion(unit_rows, dim, bits, rotation):
    # Any fixed rotation maps uniform unit vectors to uniform unit vectors, so the expectation over
    # x alone is D_mse, for one seed and for the (not Haar) randomized Hadamard rotation too.
    expected = lloyd_max_codebook(dim, bits).distortion
    if dim == 64:
        assert expected == pytest.approx(D_MSE_D64[bits], abs=TABLE_ROUNDING)
    quantizer = TurboQuantMSE(dim, bits, seed=bits, rotation=rotation)
    x = unit_rows(MSE_VECTORS, dim, seed=10 * dim + bits)
    restored = quantizer.dequantize(quantizer.quantize(x))
    assert_mean_close(np.sum((restored - x) ** 2, axis=1), expected)
    # Every reconstruction is Lloyd-Max centroids rotated back: Pi x~ lies on the codebook's grid.
    rotated = restored[:500].astype(np.float64) @ quantizer.rotation.matrix.T.astype(np.float64)
    off_grid = np.abs(rotated[..., None] - lloyd_max_codebook(dim, bits).centroids).min(axis=-1)
    assert off_grid.max() <= GRID_TOL


@pytest.mark.parametrize(("dim", "bits"), [(64, 2), (64, 3), (64, 4), (128, 3)])
def test_measured_prod_distortion_is_pi_over_2d_times_mse_at_b_minus_1(unit_rows, dim, bits):
    # For unit x and y and a Gaussian S, the estimate's variance over S is
    # (1/d) ((pi/2) gamma^2 - <r, y>^2), with r the MSE stage's residual, |r| = gamma. Over uniform
    # y independent of x, E <r, y>^2 = gamma^2 / d, and E gamma^2 = D_mse(b - 1), so
    # D_prod = (pi/2 - 1/d) / d * D_mse(b - 1): the paper's (pi / 2d) D_mse(b - 1) to first order.
    expected = (np.pi / 2 - 1 / dim) / dim * lloyd_max_codebook(dim, bits - 1).distortion
    per_seed = []
    for seed in range(PROD_SEEDS):
        quantizer = TurboQuantProd(dim, bits, seed=seed)
        x = unit_rows(PROD_VECTORS, dim, seed=1000 + seed)
        y = unit_rows(PROD_QUERIES, dim, seed=2000 + seed)
        errors = y @ x.T - quantizer.inner_products(y, quantizer.quantize(x))
        per_seed.append(np.mean(errors**2))
    assert_mean_close(np.array(per_seed), expected)


@pytest.mark.parametrize(("dim", "bits", "rotation"), [(64, 2, "haar"), (128, 3, "hadamard")])
def test_prod_inner_products_are_unbiased_over_seeds(unit_rows, dim, bits, rotation):
    # Fixed pairs: y = x (<y, x> = 1, where the MSE stage alone is biased by -D_mse(b - 1)),
    # y correlated with x, and y nearly orthogonal to x.
    x = unit_rows(3, dim, seed=7).astype(np.float32).astype(np.float64)  # exactly what is quantized
    noise = unit_rows(3, dim, seed=8)
    y = np.stack([x[0], x[1] + noise[1], noise[2]])
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    exact = np.sum(x * y, axis=1)
    errors, mse_stage_errors = [], []
    for seed in range(BIAS_SEEDS):
        prod = TurboQuantProd(dim, bits, seed=seed, rotation=rotation)
        errors.append(np.diag(prod.inner_products(y, prod.quantize(x))) - exact)
        mse = TurboQuantMSE(dim, bits - 1, seed=seed, rotation=rotation)
        mse_stage_errors.append(mse.inner_products(y[:1], mse.quantize(x[:1]))[0, 0] - exact[0])
    for pair in range(3):
        assert_mean_close(np.array(errors)[:, pair], 0.0)
    # The same check has the power to reject a biased estimator: the MSE stage alone fails it.
    with pytest.raises(AssertionError):
        assert_mean_close(np.array(mse_stage_errors), 0.0)


def test_normalized_relative_distortion_is_d_mse_for_any_norms():
    # Gaussian rows have uniform directions; with norms spread over 8 decades the relative error
    # ||x - x~||^2 / ||x||^2 must still average D_mse.
    dim, bits = 64, 2
    rng = np.random.default_rng(3)
    x = rng.standard_normal((MSE_VECTORS, dim)) * 10.0 ** rng.uniform(-4, 4, (MSE_VECTORS, 1))
    quantizer = TurboQuantMSE(dim, bits, seed=1, normalize=True)
    relative = np.sum((quantizer.dequantize(quantizer.quantize(x)) - x) ** 2, axis=1) / np.sum(x * x, axis=1)
    assert_mean_close(relative, lloyd_max_codebook(dim, bits).distortion)


# ---- contracts ------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dim", [64, 100])
@pytest.mark.parametrize(
    ("cls", "bits"),
    [
        (TurboQuantMSE, 1),
        (TurboQuantMSE, 3),
        (TurboQuantMSE, 8),
        (TurboQuantProd, 2),
        (TurboQuantProd, 3),
        (TurboQuantProd, 8),
    ],
)
def test_inner_products_agree_with_the_dequantized_vectors(unit_rows, cls, bits, dim, normalize):
    rng = np.random.default_rng(dim + bits)
    x = unit_rows(50, dim, seed=1)
    queries = unit_rows(20, dim, seed=2) * rng.uniform(0.1, 10, (20, 1))
    if normalize:
        x = x * rng.uniform(0.1, 10, (50, 1))
    quantizer = cls(dim, bits, seed=4, normalize=normalize)
    batch = quantizer.quantize(x)
    scores = quantizer.inner_products(queries, batch)
    assert scores.dtype == np.float32 and scores.shape == (20, 50)
    reference = queries @ quantizer.dequantize(batch).astype(np.float64).T
    scale = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(x, axis=1)[None, :]
    assert np.all(np.abs(scores - reference) <= FLOAT_TOL * scale)


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_normalize_stores_norms_and_scales_outputs_exactly(unit_rows, cls):
    quantizer = cls(64, 3, seed=1, normalize=True)
    x = unit_rows(30, 64, seed=4)
    queries = unit_rows(5, 64, seed=5)
    assert cls(64, 3, seed=1).quantize(x).norms is None  # without normalize, no norms are stored
    unit = quantizer.quantize(x)
    assert unit.norms.dtype == np.float32
    np.testing.assert_allclose(unit.norms, 1.0, rtol=1e-6)
    for scale in (2.0**-20, 0.25, 8.0, 2.0**40):
        scaled = quantizer.quantize(x * scale)
        np.testing.assert_allclose(scaled.norms, scale * unit.norms, rtol=EXACT_SCALE_RTOL)
        np.testing.assert_array_equal(scaled.codes, unit.codes)
        expected = scale * quantizer.dequantize(unit)
        np.testing.assert_allclose(quantizer.dequantize(scaled), expected, rtol=EXACT_SCALE_RTOL)
        expected = scale * quantizer.inner_products(queries, unit)
        np.testing.assert_allclose(quantizer.inner_products(queries, scaled), expected, rtol=EXACT_SCALE_RTOL)


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_zero_rows_round_trip_to_exactly_zero(unit_rows, cls):
    x = unit_rows(5, 64, seed=6) * 3.0
    x[[0, 3]] = 0.0
    quantizer = cls(64, 3, seed=2, normalize=True)
    batch = quantizer.quantize(x)
    np.testing.assert_array_equal(batch.norms[[0, 3]], 0.0)
    restored = quantizer.dequantize(batch)
    np.testing.assert_array_equal(restored[[0, 3]], 0.0)
    assert np.all(np.linalg.norm(restored[[1, 2, 4]], axis=1) > 1.0)
    scores = quantizer.inner_products(unit_rows(4, 64, seed=7), batch)
    np.testing.assert_array_equal(scores[:, [0, 3]], 0.0)


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_an_empty_batch_works(cls):
    quantizer = cls(64, 3, normalize=True)
    batch = quantizer.quantize(np.zeros((0, 64), np.float32))
    assert len(batch) == 0
    assert quantizer.dequantize(batch).shape == (0, 64)
    assert quantizer.inner_products(np.ones((2, 64)), batch).shape == (2, 0)


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_rows_within_the_unit_tolerance_are_accepted(unit_rows, cls):
    x = unit_rows(4, 64, seed=1) * np.array([[1 - 9e-4], [1 + 9e-4], [1.0], [1.0]])
    assert len(cls(64, 3).quantize(x)) == 4


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_float64_input_is_quantized_as_its_float32_rounding(unit_rows, cls):
    x = unit_rows(10, 64, seed=1)
    quantizer = cls(64, 3, seed=2)
    assert quantizer.quantize(x).codes.tobytes() == quantizer.quantize(x.astype(np.float32)).codes.tobytes()


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_same_seed_gives_byte_identical_batches_and_files(unit_rows, tmp_path, cls):
    x = unit_rows(40, 64, seed=9) * 3.0
    first, second = (cls(64, 3, seed=5, normalize=True).quantize(x) for _ in range(2))
    for name in ("codes", "norms", "signs", "gammas"):
        if hasattr(first, name):
            assert getattr(first, name).tobytes() == getattr(second, name).tobytes()
    first.save(tmp_path / "first.safetensors")
    second.save(tmp_path / "second.safetensors")
    assert (tmp_path / "first.safetensors").read_bytes() == (tmp_path / "second.safetensors").read_bytes()
    other = cls(64, 3, seed=6, normalize=True).quantize(x)
    assert other.codes.tobytes() != first.codes.tobytes()


# ---- bad input --------------------------------------------------------------------------------


def with_value(x: np.ndarray, row: int, value: float) -> np.ndarray:
    x = x.copy()
    x[row, 5] = value
    return x


@pytest.mark.parametrize("cls", QUANTIZERS)
@pytest.mark.parametrize(
    ("make_x", "error", "match"),
    [
        (lambda x: with_value(x, 1, np.nan), ValueError, "x row 1 contains NaN or inf"),
        (lambda x: with_value(x, 2, np.inf), ValueError, "x row 2 contains NaN or inf"),
        (lambda x: with_value(x, 0, -np.inf), ValueError, "x row 0 contains NaN or inf"),
        (lambda x: np.ones((4, 64), np.int64), TypeError, "x must be float32 or float64, got int64"),
        (lambda x: x.astype(np.float16), TypeError, "x must be float32 or float64, got float16"),
        (lambda x: x.tolist(), TypeError, "x must be a numpy array, got list"),
        (lambda x: x[0], ValueError, r"x must have shape \[n, 64\], got \[64\]"),
        (lambda x: x[:, :63], ValueError, r"x must have shape \[n, 64\], got \[4, 63\]"),
        (lambda x: x[None], ValueError, r"x must have shape \[n, 64\], got \[1, 4, 64\]"),
        (
            lambda x: x * np.array([[1], [1], [1], [1.01]]),
            ValueError,
            r"x row 3 has norm 1\.01, but .* unit-norm",
        ),
        (lambda x: with_value(x * 0, 0, 0.0), ValueError, r"x row 0 has norm 0, .*pass normalize=True"),
    ],
)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # a kernel meets the inf
def test_bad_x_raises_naming_the_problem(unit_rows, cls, make_x, error, match):
    with pytest.raises(error, match=match):
        cls(64, 3).quantize(make_x(unit_rows(4, 64)))


@pytest.mark.parametrize("cls", QUANTIZERS)
def test_non_finite_x_raises_with_normalize_too(unit_rows, cls):
    with pytest.raises(ValueError, match="x row 1 contains NaN or inf"):
        cls(64, 3, normalize=True).quantize(with_value(unit_rows(4, 64), 1, np.nan))


@pytest.mark.parametrize("cls", QUANTIZERS)
@pytest.mark.parametrize(
    ("make_queries", "error", "match"),
    [
        (lambda q: with_value(q, 1, np.nan), ValueError, "queries row 1 contains NaN or inf"),
        (lambda q: with_value(q, 0, np.inf), ValueError, "queries row 0 contains NaN or inf"),
        (lambda q: q.astype(np.int32), TypeError, "queries must be float32 or float64, got int32"),
        (lambda q: q.astype(np.float16), TypeError, "queries must be float32 or float64, got float16"),
        (lambda q: q[0], ValueError, r"queries must have shape \[n, 64\], got \[64\]"),
        (lambda q: q[:, :32], ValueError, r"queries must have shape \[n, 64\], got \[3, 32\]"),
    ],
)
def test_bad_queries_raise_naming_the_problem(unit_rows, cls, make_queries, error, match):
    quantizer = cls(64, 3)
    batch = quantizer.quantize(unit_rows(4, 64))
    with pytest.raises(error, match=match):
        quantizer.inner_products(make_queries(unit_rows(3, 64, seed=1)), batch)


@pytest.mark.parametrize("cls", QUANTIZERS)
@pytest.mark.parametrize(
    ("other", "match"),
    [
        (dict(dim=32), r"dim=32 \(quantizer 64\)"),
        (dict(bits=4), r"bits=4 \(quantizer 3\)"),
        (dict(seed=1), r"seed=1 \(quantizer 0\)"),
        (dict(rotation="hadamard"), r"rotation='hadamard' \(quantizer 'haar'\)"),
        (dict(normalize=True), r"normalize=True \(quantizer False\)"),
    ],
)
def test_a_batch_from_another_quantizer_is_rejected(unit_rows, cls, other, match):
    settings = dict(dim=64, bits=3, seed=0, rotation="haar", normalize=False) | other
    batch = cls(**settings).quantize(unit_rows(4, settings["dim"]))
    quantizer = cls(64, 3)
    with pytest.raises(ValueError, match="batch does not belong to this quantizer: " + match):
        quantizer.dequantize(batch)
    with pytest.raises(ValueError, match=match):
        quantizer.inner_products(unit_rows(2, 64), batch)


def test_a_batch_of_the_other_kind_is_rejected(unit_rows):
    x = unit_rows(4, 64)
    mse, prod = TurboQuantMSE(64, 3), TurboQuantProd(64, 3)
    with pytest.raises(TypeError, match="expected a BatchQuantizedMSE, got BatchQuantizedProd"):
        mse.dequantize(prod.quantize(x))
    with pytest.raises(TypeError, match="expected a BatchQuantizedProd, got BatchQuantizedMSE"):
        prod.inner_products(x, mse.quantize(x))
    assert isinstance(mse.quantize(x), BatchQuantizedMSE)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TurboQuantMSE(64, 0), ValueError, r"bits must be in \[1, 8\], got 0"),
        (lambda: TurboQuantMSE(64, 9), ValueError, r"bits must be in \[1, 8\], got 9"),
        (lambda: TurboQuantProd(64, 0), ValueError, r"bits must be in \[1, 8\], got 0"),
        (lambda: TurboQuantProd(64, 9), ValueError, r"bits must be in \[1, 8\], got 9"),
        (lambda: TurboQuantProd(64, 1), ValueError, "TurboQuantProd needs bits >= 2"),
        (lambda: TurboQuantMSE(1, 2), ValueError, r"dim must be in \[2, 4096\], got 1"),
        (lambda: TurboQuantProd(4097, 2), ValueError, r"dim must be in \[2, 4096\], got 4097"),
        (lambda: TurboQuantMSE(64.0, 2), TypeError, "dim must be an integer"),
        (lambda: TurboQuantMSE(100, 2, rotation="hadamard"), ValueError, "power-of-two dimension, got 100"),
        (lambda: TurboQuantProd(100, 2, rotation="hadamard"), ValueError, "power-of-two dimension, got 100"),
        (lambda: TurboQuantMSE(64, 2, rotation="givens"), ValueError, "rotation must be one of"),
        (lambda: TurboQuantMSE(64, 2, seed=-1), ValueError, "seed must be a non-negative integer, got -1"),
        (lambda: TurboQuantProd(64, 2, seed=1.5), ValueError, "seed must be a non-negative integer, got 1.5"),
        (lambda: TurboQuantMSE(64, 2, kernels="gpu"), ValueError, "unknown kernel backend 'gpu'"),
        (lambda: TurboQuantMSE(64, 2, normalize="no"), TypeError, "normalize must be True or False"),
    ],
)
def test_bad_construction_raises_naming_the_problem(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_float64_beyond_float32_range_is_named():
    x = np.zeros((3, 16))
    x[2, 5] = 1e39
    with pytest.raises(ValueError, match="x row 2 has a value beyond the float32 range"):
        TurboQuantMSE(16, 2, normalize=True).quantize(x)

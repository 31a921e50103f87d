"""The numba.cuda kernels (tq.kernels.cuda) against the NumPy oracle on fresh random inputs.

Without a GPU these run on Numba's CUDA simulator (tests/__init__.py sets NUMBA_ENABLE_CUDASIM=1),
which runs every CUDA thread as a Python thread: sizes are small, but cover several row tiles,
several 32-coordinate chunks of the scores kernel, zero-padded rows (d = 20 padded to 32, d = 3
and 4 to 8, with a padded last code byte), every code layout (b = 1, 2, 3, 4, 8; Prod from b = 2)
and both rotations. Dimensions above 2048, where the matmul reads the matrix from global memory
instead of staging it, are too slow for the simulator. Codes must equal the oracle's (and the
CPU backend's) except where the float64 rotated coordinate lies within EDGE_TIE of a cell edge;
the tolerances are tests/test_kernels.py's, for the same float32 arithmetic.
"""

from __future__ import annotations

import gc

import numba
import numpy as np
import pytest
from numba import cuda as numba_cuda

from tq.core.codebook import Codebook, lloyd_max_codebook
from tq.core.packing import padding_is_zero, unpack_codes, unpack_signs
from tq.core.rotation import Rotation, make_rotation, qjl_matrix
from tq.kernels import cpu, naive
from tq.kernels import cuda as gpu

from .conftest import TEST_SEED

if not gpu.available():
    pytest.skip("numba.cuda can run no kernels here (no GPU, simulator off)", allow_module_level=True)

EDGE_TIE = 1e-5
ATOL = 2e-5
RTOL = 1e-4

# (dim, bits, rotation, normalize); rows: 40 at d <= 20 (several row tiles except at d < 16, where one
# thread holds a whole zero-padded row), 24 at d = 64.
MSE_CASES = [
    (3, 3, "haar", True),
    (16, 1, "haar", False),
    (16, 2, "hadamard", True),
    (16, 4, "hadamard", False),
    (16, 8, "haar", True),
    (20, 3, "haar", True),
    (64, 4, "haar", True),
    (64, 8, "hadamard", False),
]
# bits are the Prod quantizer's total: the MSE stage uses a (bits - 1)-bit codebook.
PROD_CASES = [
    (4, 3, "hadamard", False),
    (16, 2, "hadamard", True),
    (16, 4, "haar", False),
    (16, 8, "hadamard", False),
    (20, 3, "haar", True),
    (64, 4, "haar", True),
]


def _rows(rng: np.random.Generator, n: int, dim: int, unit: bool) -> np.ndarray:
    """float32 [n, dim] rows of random scale (unit norm if ``unit``); row 3 is zero."""
    x = rng.standard_normal((n, dim)) * rng.uniform(0.1, 10.0, size=(n, 1))
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[3] = 0.0
    return x.astype(np.float32)


def _n_rows(dim: int) -> int:
    return 40 if dim <= 20 else 24


def _setup(dim: int, bits: int, kind: str, normalize: bool, tag: int):
    """rng, rotation, x and queries for one case (a fresh seed per run, see conftest.TEST_SEED)."""
    rng = np.random.default_rng([TEST_SEED, dim, bits, normalize, kind == "haar", tag])
    rotation = make_rotation(dim, int(rng.integers(1000)), kind)
    x = _rows(rng, _n_rows(dim), dim, unit=not normalize)
    queries = _rows(rng, 9 if dim == 16 else 5, dim, unit=False)  # 9: two query tiles of 8
    return rng, rotation, x, queries


def _rotated_oracle(x: np.ndarray, rotation: Rotation, normalize: bool) -> np.ndarray:
    x64 = x.astype(np.float64)
    if normalize:
        norms = np.linalg.norm(x64, axis=1, keepdims=True)
        x64 /= np.where(norms > 0, norms, 1.0)
    return x64 @ rotation.matrix.T.astype(np.float64)


def _assert_codes_match(
    codes: np.ndarray, other: np.ndarray, rotated: np.ndarray, codebook: Codebook
) -> None:
    dim, bits = rotated.shape[1], codebook.bits
    assert codes.dtype == np.uint8 and codes.shape == other.shape
    assert padding_is_zero(codes, dim, bits)
    a, b = unpack_codes(codes, dim, bits), unpack_codes(other, dim, bits)
    differ = a != b
    if differ.any():
        distance = np.min(np.abs(rotated[differ][:, None] - codebook.edges[None, :]), axis=1)
        assert distance.max() < EDGE_TIE, f"codes differ away from a cell edge (distance {distance.max()})"
        assert np.all(np.abs(a[differ].astype(int) - b[differ]) == 1)


@pytest.mark.parametrize(("dim", "bits", "kind", "normalize"), MSE_CASES)
def test_mse_kernels_match_oracle(dim: int, bits: int, kind: str, normalize: bool) -> None:
    _, rotation, x, queries = _setup(dim, bits, kind, normalize, 0)
    codebook = lloyd_max_codebook(dim, bits)
    codes, norms = gpu.mse_encode(x, rotation, codebook, normalize)
    oracle_codes, oracle_norms = naive.mse_encode(x, rotation, codebook, normalize)
    rotated = _rotated_oracle(x, rotation, normalize)
    _assert_codes_match(codes, oracle_codes, rotated, codebook)
    _assert_codes_match(codes, cpu.mse_encode(x, rotation, codebook, normalize)[0], rotated, codebook)
    assert norms.dtype == np.float32 and norms[3] == 0
    np.testing.assert_allclose(norms, oracle_norms, rtol=RTOL)

    stored = oracle_norms if normalize else None
    decoded = gpu.mse_decode(oracle_codes, stored, rotation, codebook)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(
        decoded,
        naive.mse_decode(oracle_codes, stored, rotation, codebook),
        rtol=RTOL,
        atol=ATOL * (10 if normalize else 1),
    )
    scores = gpu.mse_scores(queries, oracle_codes, stored, rotation, codebook)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(
        scores,
        naive.mse_scores(queries, oracle_codes, stored, rotation, codebook),
        rtol=RTOL,
        atol=ATOL * 100,
    )


@pytest.mark.parametrize(("dim", "bits", "kind", "normalize"), PROD_CASES)
def test_prod_kernels_match_oracle(dim: int, bits: int, kind: str, normalize: bool) -> None:
    rng, rotation, x, queries = _setup(dim, bits, kind, normalize, 1)
    codebook = lloyd_max_codebook(dim, bits - 1)
    qjl = qjl_matrix(dim, int(rng.integers(1000)))
    args = (rotation, qjl, codebook)
    fast = gpu.prod_encode(x, *args, normalize)
    oracle = naive.prod_encode(x, *args, normalize)
    rotated = _rotated_oracle(x, rotation, normalize)
    _assert_codes_match(fast[0], oracle[0], rotated, codebook)
    _assert_codes_match(fast[0], cpu.prod_encode(x, *args, normalize)[0], rotated, codebook)
    assert [a.dtype for a in fast] == [np.uint8, np.uint8, np.float32, np.float32]
    assert fast[1].shape == oracle[1].shape and padding_is_zero(fast[1], dim, 1)
    np.testing.assert_allclose(fast[3], oracle[3], rtol=RTOL)

    # Signs and gammas depend on the codes: compare them on rows whose codes agree, and allow a
    # sign to differ only where S r is within float tolerance of zero (as in test_kernels.py).
    same = np.all(fast[0] == oracle[0], axis=1)
    np.testing.assert_allclose(fast[2][same], oracle[2][same], rtol=RTOL, atol=ATOL)
    indices = np.searchsorted(codebook.edges, rotated)
    residual = (rotated - codebook.centroids[indices]) @ rotation.matrix.astype(np.float64)
    projected = residual @ qjl.T.astype(np.float64)
    flipped = (unpack_signs(fast[1], dim) != unpack_signs(oracle[1], dim)) & same[:, None]
    assert np.all(np.abs(projected[flipped]) < 1e-4)

    codes, signs, gammas, norms = oracle
    stored = norms if normalize else None
    np.testing.assert_allclose(
        gpu.prod_decode(codes, signs, gammas, stored, *args),
        naive.prod_decode(codes, signs, gammas, stored, *args),
        rtol=RTOL,
        atol=ATOL * (10 if normalize else 1),
    )
    np.testing.assert_allclose(
        gpu.prod_scores(queries, codes, signs, gammas, stored, *args),
        naive.prod_scores(queries, codes, signs, gammas, stored, *args),
        rtol=RTOL,
        atol=ATOL * 100,
    )


def _on_device(array) -> bool:
    return not isinstance(array, np.ndarray) and hasattr(array, "copy_to_host")


def test_device_arrays_in_give_device_arrays_out_equal_to_the_host_path() -> None:
    _, rotation, x, queries = _setup(16, 3, "hadamard", True, 2)
    x_device, queries_device = numba_cuda.to_device(x), numba_cuda.to_device(queries)

    codebook = lloyd_max_codebook(16, 3)
    codes, norms = gpu.mse_encode(x, rotation, codebook, True)
    device = gpu.mse_encode(x_device, rotation, codebook, True)
    assert all(_on_device(array) for array in device)
    np.testing.assert_array_equal(device[0].copy_to_host(), codes)
    np.testing.assert_array_equal(device[1].copy_to_host(), norms)
    decoded = gpu.mse_decode(device[0], norms, rotation, codebook)  # device codes, host norms
    assert _on_device(decoded)
    np.testing.assert_array_equal(decoded.copy_to_host(), gpu.mse_decode(codes, norms, rotation, codebook))

    prod_rotation = make_rotation(16, 7, "haar")
    prod_args = (prod_rotation, qjl_matrix(16, 7), lloyd_max_codebook(16, 2))
    host = gpu.prod_encode(x, *prod_args, True)
    device = gpu.prod_encode(x_device, *prod_args, True)
    assert all(_on_device(array) for array in device)
    for got, expected in zip(device, host, strict=True):
        np.testing.assert_array_equal(got.copy_to_host(), expected)
    decoded = gpu.prod_decode(*device, *prod_args)
    assert _on_device(decoded)
    np.testing.assert_array_equal(decoded.copy_to_host(), gpu.prod_decode(*host, *prod_args))
    scores = gpu.prod_scores(queries_device, *device, *prod_args)
    assert _on_device(scores)
    np.testing.assert_array_equal(scores.copy_to_host(), gpu.prod_scores(queries, *host, *prod_args))


def test_bad_dtypes_and_shapes_are_clear_errors() -> None:
    rotation = make_rotation(16, 0, "haar")
    codebook = lloyd_max_codebook(16, 2)
    x = np.ones((4, 16), np.float32)
    with pytest.raises(TypeError, match="x on the GPU must be float32, got float64"):
        gpu.mse_encode(numba_cuda.to_device(x.astype(np.float64)), rotation, codebook, True)
    with pytest.raises(TypeError, match="x must be a float array, got int64"):
        gpu.mse_encode(x.astype(np.int64), rotation, codebook, True)
    with pytest.raises(TypeError, match="codes must be uint8, got int32"):
        gpu.mse_decode(np.zeros((4, 4), np.int32), None, rotation, codebook)
    with pytest.raises(TypeError, match="codes must be uint8, got float32"):
        gpu.mse_decode(numba_cuda.to_device(np.zeros((4, 4), np.float32)), None, rotation, codebook)
    with pytest.raises(TypeError, match="norms on the GPU must be float32"):
        gpu.mse_decode(np.zeros((4, 4), np.uint8), numba_cuda.to_device(np.ones(4)), rotation, codebook)
    with pytest.raises(ValueError, match=r"x must have shape \[n, 16\], got \[4, 8\]"):
        gpu.mse_encode(np.ones((4, 8), np.float32), rotation, codebook, True)
    with pytest.raises(ValueError, match=r"codes must have shape \[n, 4\]"):
        gpu.mse_decode(np.zeros((4, 5), np.uint8), None, rotation, codebook)
    with pytest.raises(ValueError, match=r"norms must have shape \[4\], got \[3\]"):
        gpu.mse_decode(np.zeros((4, 4), np.uint8), np.ones(3, np.float32), rotation, codebook)
    prod_codebook = lloyd_max_codebook(16, 1)
    with pytest.raises(ValueError, match=r"signs must have shape \[4, 2\]"):
        gpu.prod_decode(
            np.zeros((4, 2), np.uint8),
            np.zeros((4, 3), np.uint8),
            np.ones(4),
            None,
            rotation,
            qjl_matrix(16, 0),
            prod_codebook,
        )


def test_empty_batches_keep_their_shapes() -> None:
    rotation = make_rotation(16, 0, "hadamard")
    codebook = lloyd_max_codebook(16, 3)
    codes, norms = gpu.mse_encode(np.zeros((0, 16), np.float32), rotation, codebook, True)
    assert codes.shape == (0, 6) and norms.shape == (0,)
    assert gpu.mse_decode(codes, norms, rotation, codebook).shape == (0, 16)
    assert gpu.mse_scores(np.ones((2, 16), np.float32), codes, norms, rotation, codebook).shape == (2, 0)


def test_constants_are_uploaded_once_and_released_with_their_arrays() -> None:
    rotation = make_rotation(16, 123, "haar")
    first = gpu._rotation_constants(rotation)
    assert gpu._rotation_constants(rotation) is first
    count = len(gpu._constants)
    del rotation
    gc.collect()
    assert len(gpu._constants) == count - 1


def test_simulated_follows_numba_config() -> None:
    assert gpu.simulated() == bool(numba.config.ENABLE_CUDASIM)

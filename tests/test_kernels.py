"""The Numba kernels against the NumPy oracle on fresh random inputs (docs/design.md section 7).

Codes must be identical except where the oracle's float64 rotated coordinate lies within
EDGE_TIE of a cell edge (the float32 kernel may round it to the other side); reconstructions and
inner products must agree within float32 tolerance.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tq import TurboQuantMSE, TurboQuantProd
from tq.core.packing import unpack_codes, unpack_signs
from tq.kernels import cpu, get_backend, naive

from .conftest import TEST_SEED

# float32 rotation of a unit vector: each coordinate carries about d * 2^-24 relative error.
EDGE_TIE = 1e-5
# reconstructions are O(1) per coordinate and scores O(|q| |x|); float32 sums of d terms.
ATOL = 2e-5
RTOL = 1e-4

DIMS = (16, 64, 96, 128, 256)
BITS = tuple(range(1, 9))


def _rows(rng: np.random.Generator, n: int, dim: int, unit: bool) -> np.ndarray:
    x = rng.standard_normal((n, dim)) * rng.uniform(0.1, 10.0, size=(n, 1))
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _rotated_oracle(x: np.ndarray, quantizer, normalize: bool) -> np.ndarray:
    x64 = x.astype(np.float64)
    if normalize:
        x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    return x64 @ quantizer.rotation.matrix.T.astype(np.float64)


def _assert_codes_match(fast: np.ndarray, oracle: np.ndarray, rotated: np.ndarray, quantizer) -> None:
    dim, bits = quantizer.dim, quantizer.codebook.bits
    a, b = unpack_codes(fast, dim, bits), unpack_codes(oracle, dim, bits)
    differ = a != b
    if differ.any():
        distance = np.min(np.abs(rotated[differ][:, None] - quantizer.codebook.edges[None, :]), axis=1)
        assert distance.max() < EDGE_TIE, f"codes differ away from a cell edge (distance {distance.max()})"
        assert np.all(np.abs(a[differ].astype(int) - b[differ]) == 1)
    assert differ.mean() < 1e-3


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("normalize", [False, True])
def test_mse_kernels_match_oracle(dim: int, bits: int, normalize: bool) -> None:
    rng = np.random.default_rng([TEST_SEED, dim, bits, normalize])
    quantizer = TurboQuantMSE(dim, bits, seed=int(rng.integers(1000)), normalize=normalize)
    x = _rows(rng, 257, dim, unit=not normalize)
    fast_codes, fast_norms = cpu.mse_encode(x, quantizer.rotation, quantizer.codebook, normalize)
    codes, norms = naive.mse_encode(x, quantizer.rotation, quantizer.codebook, normalize)
    _assert_codes_match(fast_codes, codes, _rotated_oracle(x, quantizer, normalize), quantizer)
    np.testing.assert_allclose(fast_norms, norms, rtol=RTOL)

    stored = norms if normalize else None
    np.testing.assert_allclose(
        cpu.mse_decode(codes, stored, quantizer.rotation, quantizer.codebook),
        naive.mse_decode(codes, stored, quantizer.rotation, quantizer.codebook),
        rtol=RTOL,
        atol=ATOL * (10 if normalize else 1),
    )
    queries = _rows(rng, 7, dim, unit=False)
    np.testing.assert_allclose(
        cpu.mse_scores(queries, codes, stored, quantizer.rotation, quantizer.codebook),
        naive.mse_scores(queries, codes, stored, quantizer.rotation, quantizer.codebook),
        rtol=RTOL,
        atol=ATOL * 100,
    )


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS[1:])
@pytest.mark.parametrize("normalize", [False, True])
def test_prod_kernels_match_oracle(dim: int, bits: int, normalize: bool) -> None:
    rng = np.random.default_rng([TEST_SEED, dim, bits, normalize, 1])
    quantizer = TurboQuantProd(dim, bits, seed=int(rng.integers(1000)), normalize=normalize)
    args = (quantizer.rotation, quantizer.qjl, quantizer.codebook)
    x = _rows(rng, 257, dim, unit=not normalize)
    fast = cpu.prod_encode(x, *args, normalize)
    oracle = naive.prod_encode(x, *args, normalize)
    rotated = _rotated_oracle(x, quantizer, normalize)
    _assert_codes_match(fast[0], oracle[0], rotated, quantizer)

    # Signs and gammas depend on the codes: compare them on rows whose codes agree, and allow a
    # sign to differ only where S r is within float tolerance of zero.
    same = np.all(fast[0] == oracle[0], axis=1)
    np.testing.assert_allclose(fast[2][same], oracle[2][same], rtol=RTOL, atol=ATOL)
    indices = np.searchsorted(quantizer.codebook.edges, rotated)
    residual = (rotated - quantizer.codebook.centroids[indices]) @ quantizer.rotation.matrix.astype(
        np.float64
    )
    projected = residual @ quantizer.qjl.T.astype(np.float64)
    flipped = unpack_signs(fast[1], dim) != unpack_signs(oracle[1], dim)
    flipped &= same[:, None]
    assert np.all(np.abs(projected[flipped]) < 1e-4)

    codes, signs, gammas, norms = oracle
    stored = norms if normalize else None
    np.testing.assert_allclose(
        cpu.prod_decode(codes, signs, gammas, stored, *args),
        naive.prod_decode(codes, signs, gammas, stored, *args),
        rtol=RTOL,
        atol=ATOL * (10 if normalize else 1),
    )
    queries = _rows(rng, 7, dim, unit=False)
    np.testing.assert_allclose(
        cpu.prod_scores(queries, codes, signs, gammas, stored, *args),
        naive.prod_scores(queries, codes, signs, gammas, stored, *args),
        rtol=RTOL,
        atol=ATOL * 100,
    )


def test_hadamard_rotation_matches_oracle() -> None:
    rng = np.random.default_rng([TEST_SEED, 7])
    quantizer = TurboQuantMSE(128, 4, seed=5, rotation="hadamard")
    x = _rows(rng, 300, 128, unit=True)
    fast, _ = cpu.mse_encode(x, quantizer.rotation, quantizer.codebook, False)
    oracle, _ = naive.mse_encode(x, quantizer.rotation, quantizer.codebook, False)
    _assert_codes_match(fast, oracle, _rotated_oracle(x, quantizer, False), quantizer)


def test_many_chunks_and_threads_match_single_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than one chunk: the threaded driver must give the single-thread result."""
    rng = np.random.default_rng([TEST_SEED, 11])
    x = _rows(rng, 3 * cpu.CHUNK_ROWS + 17, 64, unit=True)
    quantizer = TurboQuantProd(64, 3, seed=2)
    threaded = quantizer.quantize(x)
    monkeypatch.setenv("TQ_NUM_THREADS", "1")
    single = quantizer.quantize(x)
    for name in ("codes", "signs", "gammas"):
        np.testing.assert_array_equal(getattr(threaded, name), getattr(single, name))


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQ_KERNELS", raising=False)
    assert get_backend() is cpu
    monkeypatch.setenv("TQ_KERNELS", "naive")
    assert get_backend() is naive
    assert TurboQuantMSE(16, 2).kernels is naive
    monkeypatch.setenv("TQ_KERNELS", "gpu-please")
    with pytest.raises(ValueError, match="unknown kernel backend 'gpu-please'"):
        get_backend()


def test_each_kernel_specialization_has_its_own_disk_cache(tmp_path) -> None:
    """Numba numbers the entries of one cache index; closures of one kernel at several bit widths
    (or dimensions) sharing an index let concurrent processes overwrite each other's code. Each
    specialization gets its own index, with a single entry."""
    import pickle
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from tq import TurboQuantMSE\n"
        "x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)\n"
        "for bits in (2, 3):\n"
        "    for rotation in ('haar', 'hadamard'):\n"
        "        q = TurboQuantMSE(64, bits, rotation=rotation, normalize=True)\n"
        "        q.dequantize(q.quantize(x))\n"
        "TurboQuantMSE(128, 2, rotation='hadamard', normalize=True).quantize(np.ones((2, 128), np.float32))\n"
    )
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    indexes = sorted(tmp_path.rglob("*.nbi"))
    names = [index.name for index in indexes]
    for kernel in (
        "quantize_row_b2",
        "quantize_row_b3",
        "pack_row_b2",
        "transform_rows_d64",
        "transform_rows_d128",
    ):
        assert any(kernel in name for name in names), (kernel, names)
    for index in indexes:
        with index.open("rb") as stream:
            pickle.load(stream)  # Numba's version
            _, overloads = pickle.loads(stream.read())
        assert len(overloads) == 1, (index.name, len(overloads))

"""TurboQuant's quantizers: ``TurboQuantMSE`` (Algorithm 1) and ``TurboQuantProd`` (Algorithm 2).

Both take float rows [n, dim] and return packed batches (:mod:`tq.quant.batch`):

- ``quantize(x) -> batch``
- ``dequantize(batch) -> float32 [n, dim]``
- ``inner_products(queries, batch) -> float32 [m, n]``: estimates of <q_i, x_j> computed from the
  packed codes without reconstructing x (unbiased for Prod).

Unit-norm contract: with ``normalize=False`` every row must have norm 1 within 1e-3 (else
``ValueError``); with ``normalize=True`` any finite row is accepted (zero rows too), its norm is
stored in the batch and restored on dequantize.

Devices: ``device="cpu"`` (default), ``"cuda"`` or ``"auto"`` (:func:`tq.kernels.resolve_device`).
On "cuda", ``x`` and ``queries`` may also be float32 GPU arrays (anything with
``__cuda_array_interface__``: torch, CuPy, numba), read in place; batches are always held in host
memory (codes are 1/8 to 1/4 of the float32 input), and ``inner_products`` returns a GPU array
for GPU queries. GPU queries are not scanned for NaN on the host.
"""

from __future__ import annotations

import numpy as np

from tq.core.codebook import check_dim_bits, lloyd_max_codebook
from tq.core.rotation import make_rotation, qjl_matrix
from tq.kernels import backend_for, is_gpu_array
from tq.quant.batch import BatchQuantizedMSE, BatchQuantizedProd

UNIT_NORM_TOLERANCE = 1e-3
FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_overflow(x: np.ndarray) -> tuple[tuple[int, ...], float] | None:
    """The index and value of the first finite entry of ``x`` beyond the float32 range (one that
    becomes inf when cast to float32), or None: checked before a float64 input is cast, so
    that it is refused for what it is, not as "NaN or inf"."""
    if x.dtype != np.float64 or not x.size:
        return None
    with np.errstate(over="ignore"):
        too_large = np.isfinite(x) & np.isinf(x.astype(np.float32))
    if not too_large.any():
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(too_large)), x.shape))
    return index, float(x[index])


class _TurboQuant:
    """What both quantizers share: parameters, input checks and batch checks."""

    batch_type: type[BatchQuantizedMSE]

    def __init__(
        self,
        dim: int,
        bits: int,
        seed: int,
        rotation: str,
        normalize: bool,
        kernels: str | None,
        device: str,
    ) -> None:
        self.dim = int(dim)
        self.bits = int(bits)
        self.rotation = make_rotation(self.dim, seed, rotation)  # validates seed before int()
        self.seed = int(seed)
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = bool(normalize)
        self.device, self.kernels = backend_for(device, kernels)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, bits={self.bits}, seed={self.seed}, "
            f"rotation={self.rotation.kind!r}, normalize={self.normalize}, device={self.device!r})"
        )

    def _rows(self, x: np.ndarray, name: str) -> np.ndarray:
        """Check a [n, dim] float array and return it as C-contiguous float32 (GPU arrays as given)."""
        if is_gpu_array(x) and not isinstance(x, np.ndarray):
            return self._gpu_rows(x, name)
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [n, {self.dim}], got {list(x.shape)}")
        overflow = float32_overflow(x)
        if overflow is not None:
            (row, column), value = overflow
            raise ValueError(
                f"{name} row {row} has a value beyond the float32 range ({value:.6g} in column {column}, "
                f"float32 max {FLOAT32_MAX:.6g}): the quantizer computes in float32"
            )
        return np.ascontiguousarray(x, dtype=np.float32)

    def _gpu_rows(self, x, name: str):
        if self.device != "cuda":
            raise TypeError(f"{name} is a GPU array, but this quantizer runs on the CPU (use device='cuda')")
        interface = getattr(x, "__cuda_array_interface__", None)  # absent on simulator arrays
        typestr = interface["typestr"] if interface else np.dtype(x.dtype).str
        if typestr != "<f4":
            raise TypeError(f"{name} on the GPU must be float32, got typestr {typestr!r}")
        shape = tuple(interface["shape"] if interface else x.shape)
        if len(shape) != 2 or shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [n, {self.dim}], got {list(shape)}")
        return x

    @staticmethod
    def _check_finite(norms: np.ndarray, name: str) -> None:
        bad = ~np.isfinite(norms)
        if bad.any():
            raise ValueError(f"{name} row {int(np.argmax(bad))} contains NaN or inf")

    def _check_norms(self, norms: np.ndarray) -> None:
        self._check_finite(norms, "x")
        if not self.normalize:
            off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
            if off.any():
                row = int(np.argmax(off))
                raise ValueError(
                    f"x row {row} has norm {float(norms[row]):.6g}, but {type(self).__name__} "
                    f"expects unit-norm rows (within {UNIT_NORM_TOLERANCE}); "
                    "pass normalize=True to quantize vectors of any norm"
                )

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        queries = self._rows(queries, "queries")
        if isinstance(queries, np.ndarray):
            self._check_finite(np.sum(queries.astype(np.float64) ** 2, axis=1), "queries")
        return queries

    def _check_batch(self, batch: BatchQuantizedMSE) -> None:
        if type(batch) is not self.batch_type:
            raise TypeError(f"expected a {self.batch_type.__name__}, got {type(batch).__name__}")
        mine = (self.dim, self.bits, self.seed, self.rotation.kind, self.normalize)
        theirs = (batch.dim, batch.bits, batch.seed, batch.rotation, batch.norms is not None)
        if mine != theirs:
            names = ("dim", "bits", "seed", "rotation", "normalize")
            diff = ", ".join(
                f"{n}={t!r} (quantizer {m!r})" for n, m, t in zip(names, mine, theirs, strict=True) if m != t
            )
            raise ValueError(f"batch does not belong to this quantizer: {diff}")


class TurboQuantMSE(_TurboQuant):
    """TurboQuant MSE (Algorithm 1): y = Pi x, each y_j to its nearest Lloyd-Max centroid.

    Args:
        dim: vector dimension d (2..4096; a power of two for ``rotation="hadamard"``).
        bits: bits per coordinate b (1..8).
        seed: seed of the rotation; the same seed gives byte-identical batches.
        rotation: "haar" (random orthogonal) or "hadamard" (random signs + Walsh-Hadamard).
        normalize: store norms and quantize directions, instead of requiring unit rows.
        kernels: CPU backend, "cpu" or "naive"; default ``$TQ_KERNELS`` or "cpu".
        device: "cpu", "cuda" or "auto" (the GPU when one is present).
    """

    batch_type = BatchQuantizedMSE

    def __init__(
        self,
        dim: int,
        bits: int,
        seed: int = 0,
        rotation: str = "haar",
        normalize: bool = False,
        *,
        kernels: str | None = None,
        device: str = "cpu",
    ) -> None:
        check_dim_bits(dim, bits)
        super().__init__(dim, bits, seed, rotation, normalize, kernels, device)
        self.codebook = lloyd_max_codebook(self.dim, self.bits)

    def quantize(self, x: np.ndarray) -> BatchQuantizedMSE:
        """Quantize rows x [n, dim] -> a packed batch of n vectors."""
        x = self._rows(x, "x")
        codes, norms = map(_host, self.kernels.mse_encode(x, self.rotation, self.codebook, self.normalize))
        self._check_norms(norms)
        return BatchQuantizedMSE.from_kernel(
            dim=self.dim,
            bits=self.bits,
            seed=self.seed,
            rotation=self.rotation.kind,
            codes=codes,
            norms=norms if self.normalize else None,
        )

    def dequantize(self, batch: BatchQuantizedMSE) -> np.ndarray:
        """Reconstruct float32 [n, dim] from a batch made by this quantizer."""
        self._check_batch(batch)
        return self.kernels.mse_decode(batch.codes, batch.norms, self.rotation, self.codebook)

    def inner_products(self, queries: np.ndarray, batch: BatchQuantizedMSE) -> np.ndarray:
        """Estimates of <q_i, x_j> -> float32 [m, n], from the packed codes."""
        self._check_batch(batch)
        queries = self._queries(queries)
        return self.kernels.mse_scores(queries, batch.codes, batch.norms, self.rotation, self.codebook)


class TurboQuantProd(_TurboQuant):
    """TurboQuant Prod (Algorithm 2): MSE at bits-1, plus a 1-bit QJL sketch of the residual.

    x~ = x~_mse + sqrt(pi/2)/d * gamma * S^T sign(S r), with r = x - x~_mse, gamma = |r| and S
    an i.i.d. N(0, 1) d x d matrix; <y, x~> is an unbiased estimate of <y, x>.

    Args:
        dim: vector dimension d.
        bits: total bits per coordinate b (2..8): b-1 for the MSE stage, 1 for the sign.
        seed: seed of the rotation and of S.
        normalize: as for :class:`TurboQuantMSE`.
        rotation: rotation of the MSE stage, "haar" or "hadamard".
        kernels: CPU backend, "cpu" or "naive"; default ``$TQ_KERNELS`` or "cpu".
        device: "cpu", "cuda" or "auto" (the GPU when one is present).
    """

    batch_type = BatchQuantizedProd

    def __init__(
        self,
        dim: int,
        bits: int,
        seed: int = 0,
        normalize: bool = False,
        *,
        rotation: str = "haar",
        kernels: str | None = None,
        device: str = "cpu",
    ) -> None:
        check_dim_bits(dim, bits)
        if bits < 2:
            raise ValueError(f"TurboQuantProd needs bits >= 2 (one bit goes to the QJL sign), got {bits}")
        super().__init__(dim, bits, seed, rotation, normalize, kernels, device)
        self.codebook = lloyd_max_codebook(self.dim, self.bits - 1)
        self.qjl = qjl_matrix(self.dim, self.seed)

    def quantize(self, x: np.ndarray) -> BatchQuantizedProd:
        """Quantize rows x [n, dim] -> a packed batch of n vectors."""
        x = self._rows(x, "x")
        codes, signs, gammas, norms = map(
            _host, self.kernels.prod_encode(x, self.rotation, self.qjl, self.codebook, self.normalize)
        )
        self._check_norms(norms)
        return BatchQuantizedProd.from_kernel(
            dim=self.dim,
            bits=self.bits,
            seed=self.seed,
            rotation=self.rotation.kind,
            codes=codes,
            norms=norms if self.normalize else None,
            signs=signs,
            gammas=gammas,
        )

    def dequantize(self, batch: BatchQuantizedProd) -> np.ndarray:
        """Reconstruct float32 [n, dim] from a batch made by this quantizer."""
        self._check_batch(batch)
        return self.kernels.prod_decode(
            batch.codes, batch.signs, batch.gammas, batch.norms, self.rotation, self.qjl, self.codebook
        )

    def inner_products(self, queries: np.ndarray, batch: BatchQuantizedProd) -> np.ndarray:
        """Unbiased estimates of <q_i, x_j> -> float32 [m, n], from the packed data."""
        self._check_batch(batch)
        queries = self._queries(queries)
        return self.kernels.prod_scores(
            queries,
            batch.codes,
            batch.signs,
            batch.gammas,
            batch.norms,
            self.rotation,
            self.qjl,
            self.codebook,
        )


def _host(array) -> np.ndarray:
    """A kernel result in host memory (GPU arrays are copied back)."""
    return array if isinstance(array, np.ndarray) else array.copy_to_host()

"""Packed storage for batches of TurboQuant-quantized vectors, with validation and file I/O.

``BatchQuantizedMSE`` holds b-bit codes packed at exactly b bits per coordinate (layout in
:mod:`tq.core.packing`), and the vectors' norms when the quantizer normalizes.
``BatchQuantizedProd`` holds (b-1)-bit MSE codes, one QJL sign bit per coordinate and the
residual norm gamma per vector. Batches are validated when built and when loaded; the first
inconsistency is named in a :class:`BatchFormatError`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from tq.core.codebook import MAX_BITS, MAX_DIM, MIN_BITS, MIN_DIM
from tq.core.fileio import TensorFileError, load_tensors, save_tensors
from tq.core.packing import code_bytes, padding_is_zero
from tq.core.rotation import ROTATION_KINDS

FORMAT = "tq.batch/1"


class BatchFormatError(ValueError):
    """A batch (in memory or in a file) is inconsistent with its own metadata."""


def _check_packed(name: str, array: np.ndarray, n: int | None, dim: int, bits: int) -> None:
    width = code_bytes(dim, bits)
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise BatchFormatError(f"{name} must be a uint8 array, got {getattr(array, 'dtype', type(array))}")
    if array.ndim != 2 or array.shape[1] != width or (n is not None and array.shape[0] != n):
        rows = "n" if n is None else n
        raise BatchFormatError(
            f"{name} must have shape [{rows}, {width}] for dim={dim} at {bits} bits, got {list(array.shape)}"
        )
    if not padding_is_zero(array, dim, bits):
        raise BatchFormatError(f"{name} has non-zero padding bits in a row's last byte")


def _check_scalars(name: str, array: np.ndarray | None, n: int) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise BatchFormatError(f"{name} must be a float32 array, got {getattr(array, 'dtype', type(array))}")
    if array.shape != (n,):
        raise BatchFormatError(f"{name} must have shape [{n}], got {list(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise BatchFormatError(f"{name}[{int(np.argmin(np.isfinite(array)))}] is not finite")
    if np.any(array < 0):
        raise BatchFormatError(f"{name}[{int(np.argmax(array < 0))}] is negative")


@dataclass(frozen=True, eq=False)
class BatchQuantizedMSE:
    """Packed TurboQuant MSE codes for n vectors of dimension ``dim``.

    Attributes:
        dim: vector dimension d.
        bits: bits per coordinate b (1..8).
        seed: seed of the rotation.
        rotation: "haar" or "hadamard".
        codes: uint8 [n, ceil(d*b/8)], packed codebook indices of the rotated coordinates.
        norms: float32 [n], the vectors' L2 norms, or None for unit-norm input.
    """

    kind: ClassVar[str] = "mse"
    dim: int
    bits: int
    seed: int
    rotation: str
    codes: np.ndarray
    norms: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_kernel(cls, **fields) -> BatchQuantizedMSE:
        """Build a batch from a kernel's output without validating it again.

        For the quantizers only: kernels produce consistent arrays by construction, and the
        decode loop makes thousands of tiny batches. Everything else goes through the
        validating constructor or :meth:`load`.
        """
        batch = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(batch, name, value)
        return batch

    def rows(self, start: int, stop: int) -> BatchQuantizedMSE:
        """The batch of vectors start..stop-1 (views of this batch's arrays)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in ("codes", "norms", "signs", "gammas"):
            if fields.get(name) is not None:
                fields[name] = fields[name][start:stop]
        return type(self).from_kernel(**fields)

    @property
    def code_bits(self) -> int:
        """Bits of each coordinate's codebook index."""
        return self.bits

    def __len__(self) -> int:
        return self.codes.shape[0]

    def _check_header(self, min_bits: int) -> None:
        for name in ("dim", "bits", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise BatchFormatError(f"{name} must be an integer, got {value!r}")
        if not MIN_DIM <= self.dim <= MAX_DIM:
            raise BatchFormatError(f"dim must be in [{MIN_DIM}, {MAX_DIM}], got {self.dim}")
        if not min_bits <= self.bits <= MAX_BITS:
            raise BatchFormatError(f"bits must be in [{min_bits}, {MAX_BITS}], got {self.bits}")
        if self.seed < 0:
            raise BatchFormatError(f"seed must be non-negative, got {self.seed}")
        if self.rotation not in ROTATION_KINDS:
            raise BatchFormatError(f"rotation must be one of {ROTATION_KINDS}, got {self.rotation!r}")

    def validate(self) -> None:
        """Raise :class:`BatchFormatError` naming the first inconsistency."""
        self._check_header(MIN_BITS)
        _check_packed("codes", self.codes, None, self.dim, self.code_bits)
        if self.norms is not None:
            _check_scalars("norms", self.norms, len(self))

    def _tensors(self) -> dict[str, np.ndarray]:
        tensors = {"codes": self.codes}
        if self.norms is not None:
            tensors["norms"] = self.norms
        return tensors

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored for the vectors (codes, norms, signs, gammas)."""
        return sum(array.nbytes for array in self._tensors().values())

    @property
    def bits_per_vector(self) -> float:
        """Stored bits per vector, everything included (row padding, norms, signs, gammas)."""
        row_bytes = sum(
            (array.shape[1] if array.ndim == 2 else 1) * array.itemsize for array in self._tensors().values()
        )
        return 8.0 * row_bytes

    def save(self, path: str | os.PathLike) -> None:
        """Write the batch as a safetensors file (atomically, with a checksum)."""
        metadata = {
            "format": FORMAT,
            "kind": self.kind,
            "dim": str(self.dim),
            "bits": str(self.bits),
            "seed": str(self.seed),
            "rotation": self.rotation,
            "normalized": str(self.norms is not None).lower(),
        }
        save_tensors(path, self._tensors(), metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BatchQuantizedMSE | BatchQuantizedProd:
        """Load and validate a batch file; returns the class named in its metadata.

        Raises:
            BatchFormatError: the file is truncated, altered, or inconsistent.
        """
        try:
            tensors, metadata = load_tensors(path)
        except TensorFileError as error:
            raise BatchFormatError(str(error)) from None
        if metadata.get("format") != FORMAT:
            raise BatchFormatError(f"{path}: format is {metadata.get('format')!r}, expected {FORMAT!r}")
        kinds = {"mse": BatchQuantizedMSE, "prod": BatchQuantizedProd}
        kind = metadata.get("kind")
        if kind not in kinds or not issubclass(kinds[kind], cls):
            allowed = sorted(name for name, kind_cls in kinds.items() if issubclass(kind_cls, cls))
            raise BatchFormatError(f"{path}: kind is {kind!r}, expected one of {allowed}")
        try:
            header = {name: int(metadata[name]) for name in ("dim", "bits", "seed")}
            rotation = metadata["rotation"]
        except (KeyError, ValueError) as error:
            raise BatchFormatError(f"{path}: missing or malformed metadata ({error})") from None
        if "codes" not in tensors:
            raise BatchFormatError(f"{path}: no 'codes' tensor")
        normalized = metadata.get("normalized") == "true"
        if normalized != ("norms" in tensors):
            raise BatchFormatError(
                f"{path}: metadata normalized={normalized} but norms are "
                + ("absent" if normalized else "present")
            )
        try:
            return kinds[kind]._from_tensors(header, rotation, tensors)
        except BatchFormatError as error:
            raise BatchFormatError(f"{path}: {error}") from None

    @classmethod
    def _from_tensors(cls, header: dict[str, int], rotation: str, tensors: dict[str, np.ndarray]):
        return cls(**header, rotation=rotation, codes=tensors["codes"], norms=tensors.get("norms"))


@dataclass(frozen=True, eq=False)
class BatchQuantizedProd(BatchQuantizedMSE):
    """Packed TurboQuant Prod (MSE + QJL) data for n vectors of dimension ``dim``.

    Attributes (beyond :class:`BatchQuantizedMSE`):
        bits: total bits per coordinate b (2..8): b-1 for the MSE stage and 1 for the sign.
        codes: uint8 [n, ceil(d*(b-1)/8)], the MSE stage's packed indices.
        signs: uint8 [n, ceil(d/8)], packed signs of S r (bit set = +1).
        gammas: float32 [n], the residual norms |r| of the unit vectors.
    """

    kind: ClassVar[str] = "prod"
    signs: np.ndarray = field(default=None)
    gammas: np.ndarray = field(default=None)

    @property
    def code_bits(self) -> int:
        return self.bits - 1

    def validate(self) -> None:
        self._check_header(2)
        _check_packed("codes", self.codes, None, self.dim, self.code_bits)
        _check_packed("signs", self.signs, len(self), self.dim, 1)
        _check_scalars("gammas", self.gammas, len(self))
        if self.norms is not None:
            _check_scalars("norms", self.norms, len(self))

    def _tensors(self) -> dict[str, np.ndarray]:
        return {**super()._tensors(), "signs": self.signs, "gammas": self.gammas}

    @classmethod
    def _from_tensors(cls, header: dict[str, int], rotation: str, tensors: dict[str, np.ndarray]):
        for name in ("signs", "gammas"):
            if name not in tensors:
                raise BatchFormatError(f"no {name!r} tensor")
        return cls(
            **header,
            rotation=rotation,
            codes=tensors["codes"],
            norms=tensors.get("norms"),
            signs=tensors["signs"],
            gammas=tensors["gammas"],
        )

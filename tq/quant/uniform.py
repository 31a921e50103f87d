"""Baseline KV-cache quantizers: asymmetric uniform quantization, per token or per channel.

``UniformQuantizer`` quantizes float rows [n, dim] at b bits (1..8) with a float16 zero point
(the group's minimum) and a float16 scale ((max - min) / (2^b - 1)) per group of coordinates:

- ``axis="token"``: each row's channels in groups of ``group_size`` consecutive channels (the
  last group is shorter when group_size does not divide dim; one group when group_size >= dim).
  Zero points and scales: float16 [n, ceil(dim / group_size)].
- ``axis="channel"``: each channel over groups of ``group_size`` consecutive rows (n must be a
  multiple of group_size). Zero points and scales: float16 [n / group_size, dim].

With a ``rotation`` (tq.core.rotation), rows are rotated (y = Pi x) before quantization and rotated
back on dequantize: the "rotation followed by uniform quantization" baseline.

The cache strategies built on it (:data:`tq.cache.strategies.STRATEGIES`):

- ``"uniform"``: per-token groups, no rotation.
- ``"rotated-uniform"``: per-token groups after the cache's rotation (Haar or Hadamard).
- ``"kivi"`` (Liu et al. 2024, KIVI): keys per channel, over groups of ``group_size`` tokens of
  one head; values per token, as "uniform".

Rounding: the zero point is the largest float16 <= the minimum and the scale the smallest
float16 >= (max - zero) / (2^b - 1), so every value lies in [zero, zero + (2^b - 1) * scale]
and is reconstructed within scale / 2 (plus one float32 rounding of zero + code * scale; codes
are never clamped). A constant group has scale 0 and is rebuilt as its zero point: exactly
when the constant is a float16 number (zeros, padding), else within one float16 step.
Values (after rotation: vector norms) beyond ``MAX_ABS`` are refused: zero points and scales
must stay finite in float16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tq.core.packing import code_bytes, pack_codes, padding_is_zero, unpack_codes
from tq.core.rotation import Rotation, make_rotation

AXES = ("token", "channel")
MIN_BITS, MAX_BITS = 1, 8
# Largest |value| (rotated rows: largest norm) accepted. Zero points reach -MAX_ABS and scales
# 2 * MAX_ABS (1 bit), well inside float16's 65504 even after rounding outwards.
MAX_ABS = 2.0**14


def _integer(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_settings(bits, group_size, name: str = "uniform quantization") -> None:
    """Raise naming the problem unless bits is a whole number in [1, 8] and group_size an int >= 2."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float, np.integer, np.floating)):
        raise TypeError(f"bits must be a number, got {bits!r}")
    if not float(bits).is_integer() or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} needs a whole number of bits in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if not _integer(group_size):
        raise TypeError(f"group_size must be an integer, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")


def check_rows(x: np.ndarray, dim: int) -> None:
    """Refuse rows to quantize unless x is a float32 or float64 numpy array [n, dim] of finite
    values (the message names the problem, and the first bad row)."""
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must be a float32 or float64 numpy array, got {getattr(x, 'dtype', type(x))}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x must have shape [n, {dim}], got {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"x row {int(np.argmin(np.all(np.isfinite(x), axis=1)))} contains NaN or inf")


def first_beyond(sizes: np.ndarray, limit: float) -> tuple[int, float] | None:
    """(row, size) of the first of ``sizes`` [n] beyond ``limit``, or None when none is."""
    bad = sizes > limit
    if not bad.any():
        return None
    row = int(np.argmax(bad))
    return row, float(sizes[row])


@dataclass(frozen=True, eq=False)
class BatchUniform:
    """Packed uniform codes of n rows of dimension ``dim``, with their zero points and scales.

    Attributes:
        dim: row dimension.
        bits: bits per coordinate b (1..8).
        group_size: channels per group (axis "token") or rows per group (axis "channel").
        axis: "token" or "channel".
        codes: uint8 [n, ceil(dim * b / 8)], packed codes in 0..2^b - 1 (tq.core.packing layout).
        zeros, scales: float16 [n, ceil(dim / group_size)] (token) or [n / group_size, dim]
            (channel); scales >= 0. A coordinate is rebuilt as zero + code * scale.

    ``norms`` is always None (for the cache: these batches store no vector norms).
    """

    norms: ClassVar[None] = None
    dim: int
    bits: int
    group_size: int
    axis: str
    codes: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return self.codes.shape[0]

    def param_shape(self, n: int) -> tuple[int, int]:
        """Shape of the zero points and scales of n rows."""
        if self.axis == "token":
            return (n, -(-self.dim // self.group_size))
        return (n // self.group_size, self.dim)

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first inconsistency."""
        if not _integer(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        if not _integer(self.bits):
            raise TypeError(f"bits must be an integer, got {self.bits!r}")
        check_settings(self.bits, self.group_size)
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        codes = self.codes
        width = code_bytes(self.dim, self.bits)
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
            raise TypeError(f"codes must be a uint8 array, got {getattr(codes, 'dtype', type(codes))}")
        if codes.ndim != 2 or codes.shape[1] != width:
            raise ValueError(f"codes must have shape [n, {width}], got {list(codes.shape)}")
        if not padding_is_zero(codes, self.dim, self.bits):
            raise ValueError("codes have non-zero padding bits in a row's last byte")
        if self.axis == "channel" and len(self) % self.group_size:
            raise ValueError(
                f"per-channel batches hold whole groups: {len(self)} rows is not a multiple of "
                f"group_size {self.group_size}"
            )
        shape = self.param_shape(len(self))
        for name in ("zeros", "scales"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.dtype != np.float16:
                raise TypeError(f"{name} must be a float16 array, got {getattr(array, 'dtype', type(array))}")
            if array.shape != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(array.shape)}")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{name} has a value that is not finite")
        if np.any(self.scales < 0):
            raise ValueError("scales has a negative value")

    def rows(self, start: int, stop: int) -> BatchUniform:
        """The batch of rows start..stop-1 (views); per channel, both must fall on group bounds."""
        if self.axis == "channel":
            if start % self.group_size or stop % self.group_size:
                raise ValueError(
                    f"per-channel rows {start}..{stop} do not fall on group bounds (group_size "
                    f"{self.group_size})"
                )
            first, last = start // self.group_size, stop // self.group_size
        else:
            first, last = start, stop
        return BatchUniform(
            self.dim,
            self.bits,
            self.group_size,
            self.axis,
            self.codes[start:stop],
            self.zeros[first:last],
            self.scales[first:last],
        )

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, zero points and scales (float16, 2 bytes each)."""
        return self.codes.nbytes + self.zeros.nbytes + self.scales.nbytes


def _round_down_f16(x: np.ndarray) -> np.ndarray:
    """The largest float16 <= each value of x (float64)."""
    low = x.astype(np.float16)
    above = low.astype(np.float64) > x
    low[above] = np.nextafter(low[above], np.float16(-np.inf))
    return low


def _round_up_f16(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= each value of x (float64)."""
    high = x.astype(np.float16)
    below = high.astype(np.float64) < x
    high[below] = np.nextafter(high[below], np.float16(np.inf))
    return high


class UniformQuantizer:
    """Asymmetric uniform b-bit quantization with float16 zero points and scales.

    Args:
        dim: row dimension (>= 2).
        bits: bits per coordinate (1..8).
        group_size: channels per group (axis "token") or rows per group (axis "channel"), >= 2.
        axis: "token" (groups of channels within a row) or "channel" (each channel over groups
            of consecutive rows).
        rotation: a tq.core.rotation.Rotation of size dim, applied before quantizing, or None.
    """

    max_abs = MAX_ABS  # the largest |value| (rotated: norm) :meth:`out_of_range` accepts

    def __init__(
        self, dim: int, bits: int, group_size: int = 32, axis: str = "token", rotation: Rotation | None = None
    ) -> None:
        if not _integer(dim) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        check_settings(bits, group_size)
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if rotation is not None and rotation.dim != dim:
            raise ValueError(f"the rotation is {rotation.dim}-dimensional, but dim is {dim}")
        self.dim = int(dim)
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.axis = axis
        self.rotation = rotation
        self.levels = (1 << self.bits) - 1
        # token axis: the first channel of each group, and each group's size
        self.starts = np.arange(0, self.dim, self.group_size)
        self.sizes = np.diff(np.append(self.starts, self.dim))

    def __repr__(self) -> str:
        rotation = None if self.rotation is None else self.rotation.kind
        return (
            f"UniformQuantizer(dim={self.dim}, bits={self.bits}, group_size={self.group_size}, "
            f"axis={self.axis!r}, rotation={rotation!r})"
        )

    @property
    def rows_per_group(self) -> int:
        """Rows that share zero points and scales: group_size per channel, 1 per token."""
        return self.group_size if self.axis == "channel" else 1

    def out_of_range(self, x: np.ndarray) -> tuple[int, float] | None:
        """(row, magnitude) of the first row of x [n, dim] beyond ``MAX_ABS`` (by its largest
        |value|, or its norm when rotated), or None when every row fits."""
        if self.rotation is not None:
            size = np.linalg.norm(x.astype(np.float64), axis=1)
        else:
            size = np.max(np.abs(x), axis=1, initial=0.0)
        return first_beyond(size, MAX_ABS)

    def _expand(self, params: np.ndarray) -> np.ndarray:
        """Per-group parameters -> one per coordinate, [n, dim]."""
        if self.axis == "token":
            return np.repeat(params, self.sizes, axis=1)
        return np.repeat(params, self.group_size, axis=0)

    def quantize(self, x: np.ndarray) -> BatchUniform:
        """Quantize rows x float [n, dim] -> a packed batch (per channel, n a multiple of group_size)."""
        check_rows(x, self.dim)
        n = x.shape[0]
        if self.axis == "channel" and n % self.group_size:
            raise ValueError(
                f"per-channel quantization takes whole groups of rows: n = {n} is not a multiple of "
                f"group_size {self.group_size}"
            )
        bad = self.out_of_range(x)
        if bad is not None:
            raise ValueError(
                f"x row {bad[0]} reaches {bad[1]:.6g}, beyond {MAX_ABS:g}: its float16 zero points "
                "and scales would overflow"
            )
        # float64 keeps a row's rotation (and so its codes) independent of the batch it is in
        y = np.asarray(x, np.float32).astype(np.float64)
        if self.rotation is not None:
            y = y @ self.rotation.matrix.T.astype(np.float64)
        if self.axis == "token":
            low = np.minimum.reduceat(y, self.starts, axis=1)
            high = np.maximum.reduceat(y, self.starts, axis=1)
        else:
            grouped = y.reshape(n // self.group_size, self.group_size, self.dim)
            low, high = grouped.min(axis=1), grouped.max(axis=1)
        zeros = _round_down_f16(low)
        scales = _round_up_f16((high - zeros.astype(np.float64)) / self.levels)
        zero = self._expand(zeros.astype(np.float64))
        scale = self._expand(scales.astype(np.float64))
        steps = np.divide(y - zero, scale, out=np.zeros_like(y), where=scale > 0)
        codes = np.clip(np.rint(steps), 0, self.levels).astype(np.uint8)
        return BatchUniform(
            self.dim, self.bits, self.group_size, self.axis, pack_codes(codes, self.bits), zeros, scales
        )

    def dequantize(self, batch: BatchUniform) -> np.ndarray:
        """Reconstruct float32 [n, dim]: zero + code * scale, rotated back when rotated."""
        if not isinstance(batch, BatchUniform):
            raise TypeError(f"expected a BatchUniform, got {type(batch).__name__}")
        mine = (self.dim, self.bits, self.group_size, self.axis)
        theirs = (batch.dim, batch.bits, batch.group_size, batch.axis)
        if mine != theirs:
            names = ("dim", "bits", "group_size", "axis")
            diff = ", ".join(
                f"{n}={t!r} (quantizer {m!r})" for n, m, t in zip(names, mine, theirs, strict=True) if m != t
            )
            raise ValueError(f"batch does not belong to this quantizer: {diff}")
        codes = unpack_codes(batch.codes, self.dim, self.bits).astype(np.float32)
        zero = self._expand(batch.zeros.astype(np.float32))
        scale = self._expand(batch.scales.astype(np.float32))
        y = zero + codes * scale  # code * scale is exact in float32 (8 + 11 significant bits)
        if self.rotation is not None:  # in float64, as quantize, then rounded once
            y = y.astype(np.float64) @ self.rotation.matrix.astype(np.float64)
        return np.ascontiguousarray(y, dtype=np.float32)


@functools.cache
def shared_uniform_quantizer(
    dim: int, bits: int, group_size: int, axis: str, rotation: tuple[int, str] | None
) -> UniformQuantizer:
    """One quantizer per configuration, shared by every cache layer that uses it; ``rotation``
    is (seed, kind) of :func:`tq.core.rotation.make_rotation`, or None."""
    turn = None if rotation is None else make_rotation(dim, *rotation)
    return UniformQuantizer(dim, bits, group_size, axis, turn)

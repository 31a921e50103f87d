"""FP8 E4M3 KV-cache quantization: one byte per coordinate, optionally with a float16 row scale.

The format is E4M3 "fn" (as ``torch.float8_e4m3fn`` and ``ml_dtypes.float8_e4m3fn``): 1 sign
bit, 4 exponent bits with bias 7 and 3 mantissa bits, no infinities.

- Normal numbers (exponent field 1..15): (1 + m / 8) * 2^(e - 7), from 2^-6 up to 448 (field 15,
  mantissa 6); the step is 2^(e - 10), 8 steps per binade.
- Subnormals (exponent field 0): m * 2^-9, m = 0..7, below 2^-6.
- Zero has two codes, 0x00 and 0x80 (-0); 0x7F and 0xFF are NaN. There are 2 * 127 finite codes.

``encode_e4m3`` rounds to the nearest representable value, ties to even (to an even mantissa),
and saturates: |x| > 448, infinities included, is encoded as ±448, never as NaN (unlike
``astype(float8_e4m3fn)``, which turns out-of-range values into NaN). The sign is kept, so
negative values that round to zero are encoded as -0 (0x80). NaN is refused.

``FP8Quantizer`` quantizes float rows [n, dim]:

- ``scale="token"``: each row gets a float16 scale, the smallest float16 >= max|x| / 448, so
  the scaled row x / scale lies within [-448, 448] and is never saturated; the codes encode
  x / scale and a coordinate is rebuilt as decode(code) * scale (exact in float32: 4 + 11
  significant bits). A zero row has scale 0 and is rebuilt exactly as 0. A coordinate is
  reconstructed within half an E4M3 step of its scaled value, times the scale: relative error
  <= 2^-4 while |x| / scale >= 2^-6 (normal numbers), absolute error <= 2^-10 * scale below.
  Rows whose max |x| exceeds ``MAX_ABS`` (448 * 65504) are refused: their scale would
  overflow float16. Stored: 8 bits per coordinate plus 16 bits per row.
- ``scale=None``: the values are encoded as they are, saturating at ±448 (the cache applies a
  per-head scale itself, outside the quantizer). Stored: 8 bits per coordinate.

Inputs are rounded to float32 first, so a row's codes do not depend on the input dtype; the
arithmetic is then done in float64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tq.quant.uniform import _integer, _round_up_f16, check_rows, first_beyond

FP8_MAX = 448.0  # largest finite E4M3 number
# Largest max |x| of a row accepted with scale="token": its scale max|x| / 448 must round up to
# a finite float16 (at most 65504). Exact in float32.
MAX_ABS = FP8_MAX * 65504.0
SCALES = ("token", None)
NAN_CODES = (0x7F, 0xFF)

_MIN_NORMAL = 2.0**-6  # smallest normal E4M3 number
_MIN_EXP = -9  # log2 of the subnormal step


def _decode_table() -> np.ndarray:
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(
        exponent == 0,
        np.ldexp(mantissa.astype(np.float64), _MIN_EXP),
        np.ldexp(1.0 + mantissa / 8.0, exponent - 7),
    )
    values = np.where(codes & 0x80, -magnitude, magnitude)
    values[list(NAN_CODES)] = np.nan
    return values.astype(np.float32)


# code -> value, float32 [256]; codes 0x7F and 0xFF are NaN
DECODE_TABLE = _decode_table()
DECODE_TABLE.setflags(write=False)


def encode_e4m3(x: np.ndarray) -> np.ndarray:
    """E4M3 codes (uint8, x's shape) of float values: round to nearest, ties to even, saturating
    at ±448 (infinities included); the sign of zero is kept. Raises ValueError on NaN."""
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x must be a float numpy array, got {getattr(x, 'dtype', type(x))}")
    if np.isnan(x).any():
        raise ValueError("x contains NaN: E4M3 codes are only made for numbers")
    value = x.astype(np.float64)  # exact for float16 and float32
    magnitude = np.minimum(np.abs(value), FP8_MAX)
    # magnitude = fraction * 2^exponent with fraction in [0.5, 1): a normal number's step is
    # 2^(exponent - 4) (3 mantissa bits below the leading one), a subnormal's 2^-9
    _, exponent = np.frexp(magnitude)
    step = np.maximum(exponent - 4, _MIN_EXP)
    # rint rounds half to even: an even step count is an even mantissa. The result may carry
    # into the next binade (still representable: 448 itself is on the grid, so no overflow).
    rounded = np.ldexp(np.rint(np.ldexp(magnitude, -step)), step)
    fraction, exponent = np.frexp(rounded)
    # normal: field (exponent + 6) << 3 | (16 * fraction - 8); subnormal: field 0, mantissa rounded / 2^-9
    normal = 8.0 * exponent + 40.0 + 16.0 * fraction
    subnormal = np.ldexp(rounded, -_MIN_EXP)
    codes = np.where(rounded >= _MIN_NORMAL, normal, subnormal).astype(np.uint8)
    codes |= np.signbit(value).astype(np.uint8) << 7
    return codes


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """Float32 values (codes' shape) of E4M3 codes (uint8); 0x7F and 0xFF decode to NaN."""
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        raise TypeError(f"codes must be a uint8 array, got {getattr(codes, 'dtype', type(codes))}")
    return DECODE_TABLE[codes]


@dataclass(frozen=True, eq=False)
class BatchFP8:
    """E4M3 codes of n rows of dimension ``dim``, with their float16 scales (or none).

    Attributes:
        dim: row dimension.
        codes: uint8 [n, dim], one E4M3 code per coordinate (never a NaN code).
        scales: float16 [n], finite and >= 0 (scale "token"), or None (no stored scale). A
            coordinate is rebuilt as decode(code) * scale, or decode(code) without scales.

    ``norms`` is always None (for the cache: these batches store no vector norms).
    """

    norms: ClassVar[None] = None
    dim: int
    codes: np.ndarray
    scales: np.ndarray | None

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return self.codes.shape[0]

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first inconsistency."""
        if not _integer(self.dim) or self.dim < 1:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        codes = self.codes
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
            raise TypeError(f"codes must be a uint8 array, got {getattr(codes, 'dtype', type(codes))}")
        if codes.ndim != 2 or codes.shape[1] != self.dim:
            raise ValueError(f"codes must have shape [n, {self.dim}], got {list(codes.shape)}")
        if np.any((codes & 0x7F) == 0x7F):
            raise ValueError("codes has a NaN code (0x7F or 0xFF)")
        scales = self.scales
        if scales is None:
            return
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float16:
            raise TypeError(
                f"scales must be a float16 array or None, got {getattr(scales, 'dtype', type(scales))}"
            )
        if scales.shape != (len(self),):
            raise ValueError(f"scales must have shape [{len(self)}], got {list(scales.shape)}")
        if not np.all(np.isfinite(scales)):
            raise ValueError("scales has a value that is not finite")
        if np.any(scales < 0):
            raise ValueError("scales has a negative value")

    def rows(self, start: int, stop: int) -> BatchFP8:
        """The batch of rows start..stop-1 (views)."""
        scales = None if self.scales is None else self.scales[start:stop]
        return BatchFP8(self.dim, self.codes[start:stop], scales)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes (1 byte each) and scales (float16, 2 bytes each) when present."""
        return self.codes.nbytes + (0 if self.scales is None else self.scales.nbytes)


class FP8Quantizer:
    """FP8 E4M3 quantization of rows, with a float16 scale per row or none.

    Args:
        dim: row dimension (>= 2).
        scale: "token" (each row scaled by a float16 scale, the smallest float16 >= its
            max |x| / 448) or None (values encoded as they are, saturating at ±448).
    """

    rows_per_group = 1  # each row is quantized on its own
    rotation = None
    bits = 8
    max_abs = MAX_ABS  # the largest max |x| of a row :meth:`out_of_range` accepts

    def __init__(self, dim: int, scale: str | None = "token") -> None:
        if not _integer(dim) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.dim = int(dim)
        self.scale = scale

    def __repr__(self) -> str:
        return f"FP8Quantizer(dim={self.dim}, scale={self.scale!r})"

    def out_of_range(self, x: np.ndarray) -> tuple[int, float] | None:
        """(row, max |value|) of the first row of x [n, dim] beyond ``MAX_ABS`` (its float16
        scale would overflow), or None when every row fits. Always None with scale None: values
        beyond 448 saturate."""
        if self.scale is None:
            return None
        return first_beyond(np.max(np.abs(x), axis=1, initial=0.0), MAX_ABS)

    def quantize(self, x: np.ndarray) -> BatchFP8:
        """Quantize rows x float [n, dim] -> a batch of E4M3 codes (and scales with "token")."""
        check_rows(x, self.dim)
        bad = self.out_of_range(x)
        if bad is not None:
            raise ValueError(
                f"x row {bad[0]} reaches {bad[1]:.6g}, beyond {MAX_ABS:g} (448 * 65504): its float16 "
                "scale would overflow"
            )
        if self.scale is None:
            # clipped first so that float64 values beyond float32's range saturate, not overflow
            y = np.clip(x, -FP8_MAX, FP8_MAX).astype(np.float32)
            return BatchFP8(self.dim, encode_e4m3(y), None)
        y = np.asarray(x, np.float32).astype(np.float64)
        scales = _round_up_f16(np.max(np.abs(y), axis=1, initial=0.0) / FP8_MAX)
        scale = scales.astype(np.float64)[:, None]
        # |y| / scale <= 448: scale >= max|y| / 448 and the division rounds monotonically
        scaled = np.divide(y, scale, out=np.zeros_like(y), where=scale > 0)
        return BatchFP8(self.dim, encode_e4m3(scaled), scales)

    def dequantize(self, batch: BatchFP8) -> np.ndarray:
        """Reconstruct float32 [n, dim]: decode(code) * scale, or decode(code) without scales."""
        if not isinstance(batch, BatchFP8):
            raise TypeError(f"expected a BatchFP8, got {type(batch).__name__}")
        if batch.dim != self.dim:
            raise ValueError(
                f"batch does not belong to this quantizer: dim={batch.dim} (quantizer {self.dim})"
            )
        if (batch.scales is None) != (self.scale is None):
            held = "no scales" if batch.scales is None else "scales"
            raise ValueError(
                f"batch does not belong to this quantizer: it has {held}, quantizer scale={self.scale!r}"
            )
        values = decode_e4m3(batch.codes)
        if batch.scales is None:
            return np.ascontiguousarray(values)
        # exact in float32: 4 significant bits times 11, far above float32's smallest normal
        return np.ascontiguousarray(values * batch.scales.astype(np.float32)[:, None])


@functools.cache
def shared_fp8_quantizer(dim: int, scale: str | None) -> FP8Quantizer:
    """One quantizer per configuration, shared by every cache layer that uses it."""
    return FP8Quantizer(dim, scale)

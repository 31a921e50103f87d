"""FP8 E4M3 encoding (tq.quant.fp8) against ml_dtypes and torch, and the FP8 quantizer.

Tolerances: encoding is compared bit for bit with ``ml_dtypes.float8_e4m3fn`` and
``torch.float8_e4m3fn`` on |x| <= 448 (ml_dtypes turns larger values into NaN, so saturation is
checked on its own). The quantizer with scale="token" rebuilds a coordinate as
decode(code) * scale, exact in float32, where code is x / scale rounded to the E4M3 grid; the
error is at most half a grid step at |x| / scale, times the scale: 2^(floor(log2(|x| / scale)) - 4)
* scale for normal numbers (so relative error <= 2^-4), 2^-10 * scale for subnormals.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tq.quant.fp8 import (
    DECODE_TABLE,
    FP8_MAX,
    MAX_ABS,
    BatchFP8,
    FP8Quantizer,
    decode_e4m3,
    encode_e4m3,
)

CODES = np.arange(256, dtype=np.uint8)
FINITE = np.array([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=np.uint8)
# the 127 non-negative finite values, ascending (codes 0x00..0x7E)
POSITIVE = DECODE_TABLE[:0x7F].astype(np.float64)


def _ml_dtypes(x: np.ndarray) -> np.ndarray:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def _torch(x: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _decode_ml_dtypes(codes: np.ndarray) -> np.ndarray:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _decode_torch(codes: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()


REFERENCES = pytest.mark.parametrize("reference", [_ml_dtypes, _torch], ids=["ml_dtypes", "torch"])


def _assert_codes(x: np.ndarray, reference) -> None:
    """encode_e4m3(x) equals the reference's codes, element by element (x float32, |x| <= 448)."""
    mine, theirs = encode_e4m3(x), reference(x)
    assert mine.dtype == np.uint8 and mine.shape == x.shape
    wrong = np.flatnonzero(mine != theirs)
    assert wrong.size == 0, (
        f"{wrong.size} codes differ, first x={x.flat[wrong[0]]!r}: {mine.flat[wrong[0]]:#04x} "
        f"vs {theirs.flat[wrong[0]]:#04x}"
    )


def _gaussian(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize(
    ("reference", "decode"),
    [(_ml_dtypes, _decode_ml_dtypes), (_torch, _decode_torch)],
    ids=["ml_dtypes", "torch"],
)
def test_decode_matches_reference_on_every_code(reference, decode):
    values = decode_e4m3(CODES)
    assert values.dtype == np.float32 and values.shape == (256,)
    np.testing.assert_array_equal(values, decode(CODES))  # NaN where the reference has NaN
    # the reference encodes each finite value back to its own code
    np.testing.assert_array_equal(reference(values[FINITE]), FINITE)
    assert np.isnan(values[[0x7F, 0xFF]]).all()
    assert values[0x7E] == FP8_MAX and values[0xFE] == -FP8_MAX
    assert values[0x01] == 2.0**-9 and values[0x08] == 2.0**-6  # smallest subnormal and normal


def test_decode_table_by_its_definition():
    for code in FINITE.tolist():
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        value = mantissa * 2.0**-9 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        assert decode_e4m3(np.array([code], np.uint8))[0] == sign * value


def test_round_trip_of_every_finite_code_is_identity():
    np.testing.assert_array_equal(encode_e4m3(decode_e4m3(FINITE)), FINITE)
    # shapes are kept
    codes = FINITE[:120].reshape(2, 3, 20)
    np.testing.assert_array_equal(encode_e4m3(decode_e4m3(codes)), codes)


@REFERENCES
@pytest.mark.parametrize("scale", [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3])
def test_encode_matches_reference_on_gaussians(reference, scale):
    x = _gaussian(int(np.log10(scale)) + 10, (20_000,), scale)
    x = x[np.abs(x) <= FP8_MAX]
    _assert_codes(x, reference)


@REFERENCES
def test_midpoints_round_to_even(reference):
    # exact midpoints between consecutive representable values, both signs (exact in float32)
    low, high = POSITIVE[:-1], POSITIVE[1:]
    middle = ((low + high) / 2).astype(np.float32)
    assert np.array_equal(middle.astype(np.float64), (low + high) / 2)
    codes = encode_e4m3(middle)
    # ties go to the even code (even mantissa): one of the two neighbours, whichever is even
    below = np.arange(0x7E, dtype=np.uint8)
    np.testing.assert_array_equal(codes, np.where(below % 2 == 0, below, below + 1))
    np.testing.assert_array_equal(encode_e4m3(-middle), codes | 0x80)
    _assert_codes(np.concatenate([middle, -middle]), reference)
    # one float32 ulp either side of a midpoint goes to the nearer value
    np.testing.assert_array_equal(encode_e4m3(np.nextafter(middle, np.float32(0))), below)
    np.testing.assert_array_equal(encode_e4m3(np.nextafter(middle, np.float32(np.inf))), below + 1)
    _assert_codes(np.nextafter(middle, np.float32(0)), reference)
    _assert_codes(np.nextafter(middle, np.float32(np.inf)), reference)


@REFERENCES
def test_subnormals_and_underflow(reference):
    rng = np.random.default_rng(7)
    x = rng.uniform(-(2.0**-5), 2.0**-5, 20_000).astype(np.float32)  # the subnormal range and above
    tiny = rng.uniform(-(2.0**-10), 2.0**-10, 2_000).astype(np.float32)  # all round to +-0
    _assert_codes(x, reference)
    _assert_codes(tiny, reference)
    np.testing.assert_array_equal(encode_e4m3(tiny), np.where(tiny < 0, 0x80, 0x00))
    # the subnormal grid, step 2^-9, and 2^-10 (a tie) rounds to even: to 0
    grid = np.arange(8, dtype=np.float32) * np.float32(2.0**-9)
    np.testing.assert_array_equal(encode_e4m3(grid), np.arange(8))
    assert encode_e4m3(np.array([2.0**-10, 3 * 2.0**-10, 2.0**-6 - 2.0**-10], np.float32)).tolist() == [
        0,
        2,
        8,
    ]


@REFERENCES
def test_zero_and_negative_zero(reference):
    x = np.array([0.0, -0.0], np.float32)
    assert encode_e4m3(x).tolist() == [0x00, 0x80]
    _assert_codes(x, reference)
    back = decode_e4m3(np.array([0x00, 0x80], np.uint8))
    assert back.tolist() == [0.0, 0.0] and np.signbit(back).tolist() == [False, True]


@given(st.lists(st.floats(-FP8_MAX, FP8_MAX, width=32), min_size=1, max_size=64))
def test_encode_matches_ml_dtypes_on_any_float32(values):
    _assert_codes(np.array(values, np.float32), _ml_dtypes)


def test_encode_saturates_beyond_448():
    big = np.array([448.0, 448.001, 463.9, 464.0, 480.0, 1e6, 3e38, np.inf], np.float32)
    assert encode_e4m3(big).tolist() == [0x7E] * big.size
    assert encode_e4m3(-big).tolist() == [0xFE] * big.size
    assert np.all(np.abs(decode_e4m3(encode_e4m3(big))) == FP8_MAX)
    # float64 input beyond float32's range saturates as well
    assert encode_e4m3(np.array([1e300, -1e300])).tolist() == [0x7E, 0xFE]


def test_encode_accepts_float16_and_float64():
    x = _gaussian(3, (1000,), 10.0)
    expected = encode_e4m3(x)
    np.testing.assert_array_equal(encode_e4m3(x.astype(np.float64)), expected)
    half = x.astype(np.float16)
    np.testing.assert_array_equal(encode_e4m3(half), encode_e4m3(half.astype(np.float32)))


def test_encode_and_decode_refuse_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        encode_e4m3(np.array([1.0, np.nan], np.float32))
    with pytest.raises(TypeError, match="float numpy array"):
        encode_e4m3(np.array([1, 2], np.int32))
    with pytest.raises(TypeError, match="float numpy array"):
        encode_e4m3([1.0, 2.0])
    with pytest.raises(TypeError, match="uint8"):
        decode_e4m3(np.array([1, 2], np.int64))


# ---------------------------------------------------------------- the quantizer


def _half_step(v: np.ndarray) -> np.ndarray:
    """Half the E4M3 grid step at magnitude v (float64): 2^(e - 4) for 2^e <= v < 2^(e+1), e >= -6."""
    exponent = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-6)))
    return np.ldexp(1.0, (exponent - 4).astype(int))


@pytest.mark.parametrize("spread", [1e-3, 1.0, 30.0, 1e4])
def test_token_scale_error_is_within_half_a_step(spread):
    x = _gaussian(11, (64, 96), spread)
    x[:, :3] *= 20  # outlier channels
    x[5] = 0.0  # a zero row
    quantizer = FP8Quantizer(96, "token")
    batch = quantizer.quantize(x)
    assert batch.scales.dtype == np.float16 and batch.scales.shape == (64,)
    scale = batch.scales.astype(np.float64)
    # the scale is the smallest float16 >= max|x| / 448
    peak = np.max(np.abs(x.astype(np.float64)), axis=1)
    assert np.all(scale * FP8_MAX >= peak)
    below = np.nextafter(batch.scales, np.float16(-np.inf)).astype(np.float64)
    assert np.all((below * FP8_MAX < peak) | (scale == 0))
    rebuilt = quantizer.dequantize(batch)
    assert rebuilt.dtype == np.float32 and rebuilt.shape == x.shape
    error = np.abs(rebuilt.astype(np.float64) - x)
    scaled = np.divide(x, scale[:, None], out=np.zeros(x.shape), where=scale[:, None] > 0)
    assert np.all(error <= _half_step(scaled) * scale[:, None])
    normal = np.abs(scaled) >= 2.0**-6
    assert np.all(error[normal] <= 2.0**-4 * np.abs(x[normal]))
    # the zero row: scale 0, rebuilt exactly
    assert batch.scales[5] == 0 and np.all(rebuilt[5] == 0)
    # rebuilt as decode(code) * scale, in float32
    np.testing.assert_array_equal(
        rebuilt, decode_e4m3(batch.codes) * batch.scales.astype(np.float32)[:, None]
    )


def test_token_scale_uses_the_whole_range():
    # each row's largest |value| lands near 448 on the scaled grid: never saturated, never NaN
    x = _gaussian(12, (200, 32), 5.0)
    batch = FP8Quantizer(32).quantize(x)
    top = np.max(np.abs(decode_e4m3(batch.codes)), axis=1)
    assert np.all(top <= FP8_MAX) and np.all(top >= FP8_MAX / 2)
    assert not np.any((batch.codes & 0x7F) == 0x7F)


def test_tiny_and_huge_rows():
    quantizer = FP8Quantizer(4)
    x = np.array(
        [[1e-7, -2e-7, 0.0, 3e-8], [-0.0, 0.0, -0.0, 0.0], [MAX_ABS, -1.0, 0.5, 1e6], [1.0, 2.0, 3.0, 4.0]],
        np.float32,
    )
    batch = quantizer.quantize(x)
    rebuilt = quantizer.dequantize(batch)
    assert batch.scales[0] > 0  # a float16 subnormal, not 0
    assert batch.scales[1] == 0 and np.all(rebuilt[1] == 0)
    assert batch.scales[2] == np.float16(65504)  # max|x| = MAX_ABS exactly still fits
    assert rebuilt[2, 0] == MAX_ABS
    assert np.all(np.abs(rebuilt[3] - x[3]) <= 2.0**-4 * x[3])
    assert abs(rebuilt[0, 0] - 1e-7) <= 2.0**-4 * 1e-7


def test_no_scale_encodes_values_as_they_are_and_saturates():
    quantizer = FP8Quantizer(8, None)
    x = _gaussian(13, (50, 8), 200.0)
    x[0, :4] = [449.0, -1e5, 3e38, -500.0]
    batch = quantizer.quantize(x)
    assert batch.scales is None
    np.testing.assert_array_equal(batch.codes, encode_e4m3(x))
    rebuilt = quantizer.dequantize(batch)
    np.testing.assert_array_equal(rebuilt, decode_e4m3(encode_e4m3(x)))
    assert rebuilt[0, :4].tolist() == [448.0, -448.0, 448.0, -448.0]
    assert quantizer.out_of_range(x) is None
    # float64 beyond float32's range saturates too, without overflow warnings
    wide = np.full((1, 8), 1e300)
    wide[0, 1] = -1e300
    with np.errstate(all="raise"):
        assert quantizer.dequantize(quantizer.quantize(wide))[0, :2].tolist() == [448.0, -448.0]


def test_rows_are_independent_and_float64_matches_float32():
    x = _gaussian(14, (30, 16), 3.0)
    for scale in ("token", None):
        quantizer = FP8Quantizer(16, scale)
        batch = quantizer.quantize(x)
        one = quantizer.quantize(x[7:8])
        np.testing.assert_array_equal(one.codes, batch.codes[7:8])
        wide = quantizer.quantize(x.astype(np.float64))
        np.testing.assert_array_equal(wide.codes, batch.codes)
        if scale is not None:
            np.testing.assert_array_equal(one.scales, batch.scales[7:8])
            np.testing.assert_array_equal(wide.scales, batch.scales)


@pytest.mark.parametrize("scale", ["token", None])
def test_rows_len_and_nbytes(scale):
    x = _gaussian(15, (40, 24), 2.0)
    quantizer = FP8Quantizer(24, scale)
    batch = quantizer.quantize(x)
    assert len(batch) == 40 and batch.dim == 24 and batch.norms is None
    assert batch.codes.shape == (40, 24) and batch.codes.dtype == np.uint8
    assert batch.nbytes == 40 * 24 + (2 * 40 if scale else 0)
    part = batch.rows(10, 25)
    assert len(part) == 15 and part.nbytes == 15 * 24 + (2 * 15 if scale else 0)
    assert np.shares_memory(part.codes, batch.codes)
    np.testing.assert_array_equal(quantizer.dequantize(part), quantizer.dequantize(batch)[10:25])
    assert len(batch.rows(5, 5)) == 0
    empty = quantizer.quantize(np.zeros((0, 24), np.float32))
    assert len(empty) == 0 and quantizer.dequantize(empty).shape == (0, 24)


def test_quantizer_attributes_and_repr():
    quantizer = FP8Quantizer(64)
    assert (quantizer.dim, quantizer.scale, quantizer.bits) == (64, "token", 8)
    assert quantizer.rows_per_group == 1 and quantizer.rotation is None
    assert repr(quantizer) == "FP8Quantizer(dim=64, scale='token')"
    assert repr(FP8Quantizer(8, None)) == "FP8Quantizer(dim=8, scale=None)"


def test_out_of_range_with_token_scale():
    quantizer = FP8Quantizer(4)
    x = np.ones((3, 4), np.float32)
    assert quantizer.out_of_range(x) is None
    x[1, 2] = -MAX_ABS  # still fits
    assert quantizer.out_of_range(x) is None
    x[2, 0] = 3e7
    assert quantizer.out_of_range(x) == (2, 3e7)
    with pytest.raises(ValueError, match=r"x row 2 reaches 3e\+07, beyond .*float16 scale would overflow"):
        quantizer.quantize(x)


def test_quantizer_refuses_bad_input():
    quantizer = FP8Quantizer(8)
    x = np.ones((4, 8), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[3, 1] = bad
        with pytest.raises(ValueError, match="x row 3 contains NaN or inf"):
            quantizer.quantize(y)
        with pytest.raises(ValueError, match="x row 3 contains NaN or inf"):
            FP8Quantizer(8, None).quantize(y)
    with pytest.raises(ValueError, match=r"shape \[n, 8\], got \[8\]"):
        quantizer.quantize(x[0])
    with pytest.raises(ValueError, match=r"shape \[n, 8\], got \[4, 7\]"):
        quantizer.quantize(x[:, :7])
    with pytest.raises(TypeError, match="float32 or float64"):
        quantizer.quantize(x.astype(np.float16))
    with pytest.raises(TypeError, match="float32 or float64"):
        quantizer.quantize(x.astype(np.int32))
    with pytest.raises(TypeError, match="float32 or float64"):
        quantizer.quantize(x.tolist())
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        FP8Quantizer(1)
    with pytest.raises(ValueError, match="dim must be an integer >= 2"):
        FP8Quantizer(8.0)
    with pytest.raises(ValueError, match="scale must be one of"):
        FP8Quantizer(8, "head")


def test_dequantize_refuses_foreign_batches():
    x = np.ones((2, 8), np.float32)
    token, plain = FP8Quantizer(8), FP8Quantizer(8, None)
    with pytest.raises(TypeError, match="expected a BatchFP8"):
        token.dequantize(x)
    with pytest.raises(ValueError, match=r"dim=16 \(quantizer 8\)"):
        token.dequantize(FP8Quantizer(16).quantize(np.ones((2, 16), np.float32)))
    with pytest.raises(ValueError, match="it has no scales"):
        token.dequantize(plain.quantize(x))
    with pytest.raises(ValueError, match="it has scales"):
        plain.dequantize(token.quantize(x))


def test_batch_validation():
    codes = np.zeros((3, 4), np.uint8)
    scales = np.ones(3, np.float16)
    BatchFP8(4, codes, scales)
    BatchFP8(4, codes, None)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        BatchFP8(0, codes, scales)
    with pytest.raises(TypeError, match="codes must be a uint8 array"):
        BatchFP8(4, codes.astype(np.int8), scales)
    with pytest.raises(ValueError, match=r"codes must have shape \[n, 5\], got \[3, 4\]"):
        BatchFP8(5, codes, scales)
    with pytest.raises(ValueError, match="NaN code"):
        BatchFP8(4, np.full((3, 4), 0xFF, np.uint8), scales)
    with pytest.raises(TypeError, match="scales must be a float16 array or None"):
        BatchFP8(4, codes, scales.astype(np.float32))
    with pytest.raises(ValueError, match=r"scales must have shape \[3\], got \[2\]"):
        BatchFP8(4, codes, scales[:2])
    with pytest.raises(ValueError, match="not finite"):
        BatchFP8(4, codes, np.array([1, np.inf, 1], np.float16))
    with pytest.raises(ValueError, match="negative"):
        BatchFP8(4, codes, np.array([1, -1, 1], np.float16))
    batch = BatchFP8(4, codes, scales)
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.codes = codes  # type: ignore[misc]

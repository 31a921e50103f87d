"""Bit packing of b-bit codes and sign bits (the layout every kernel shares)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tq.core.packing import code_bytes, pack_codes, pack_signs, padding_is_zero, unpack_codes, unpack_signs


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    shape = (draw(st.integers(0, 5)), draw(st.integers(1, 70)))
    codes = draw(arrays(np.uint8, shape, elements=st.integers(0, 2**bits - 1)))
    return codes, bits


@given(codes_and_bits())
def test_pack_unpack_codes_round_trip(codes_bits):
    codes, bits = codes_bits
    n, dim = codes.shape
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (n, -(-dim * bits // 8)) == (n, code_bytes(dim, bits))
    assert padding_is_zero(packed, dim, bits)
    np.testing.assert_array_equal(unpack_codes(packed, dim, bits), codes)


@given(arrays(np.bool_, st.tuples(st.integers(0, 5), st.integers(1, 70))))
def test_pack_unpack_signs_round_trip(positive):
    n, dim = positive.shape
    packed = pack_signs(positive)
    assert packed.dtype == np.uint8 and packed.shape == (n, -(-dim // 8))
    signs = unpack_signs(packed, dim)
    assert signs.dtype == np.float32
    np.testing.assert_array_equal(signs, np.where(positive, 1.0, -1.0))


@pytest.mark.parametrize(
    ("dim", "bits", "nbytes"),
    [(8, 3, 3), (64, 3, 24), (5, 3, 2), (64, 1, 8), (63, 1, 8), (100, 3, 38), (3, 8, 3), (128, 4, 64)],
)
def test_a_row_takes_exactly_ceil_d_b_over_8_bytes(dim, bits, nbytes):
    assert code_bytes(dim, bits) == nbytes
    assert pack_codes(np.zeros((2, dim), np.uint8), bits).shape == (2, nbytes)


def test_layout_is_a_little_endian_bit_stream():
    # Codes 1, 2, 3 at 2 bits: stream (LSB first) 10 01 11, so byte 0 = 0b00111001.
    np.testing.assert_array_equal(pack_codes(np.array([[1, 2, 3]], np.uint8), 2), [[0b00111001]])
    # A 3-bit code straddles bytes: code 1 = 0b111 occupies stream bits 3..5, code 2 = 0b101 bits 6..8.
    np.testing.assert_array_equal(pack_codes(np.array([[0, 7, 5]], np.uint8), 3), [[0b01111000, 0b1]])
    np.testing.assert_array_equal(pack_signs(np.array([[True, False, False, True]])), [[0b1001]])


def test_non_zero_padding_is_detected():
    packed = pack_codes(np.ones((3, 5), np.uint8), 3)  # 15 bits: the top bit of byte 1 is padding
    assert padding_is_zero(packed, 5, 3)
    packed[1, -1] |= 0x80
    assert not padding_is_zero(packed, 5, 3)
    assert padding_is_zero(pack_codes(np.ones((3, 8), np.uint8), 3), 8, 3)  # 24 bits: no padding


def test_a_code_too_large_for_its_bits_raises():
    with pytest.raises(ValueError, match="a code is 8, which does not fit in 3 bits"):
        pack_codes(np.array([[1, 8]], np.uint8), 3)


def test_codes_must_be_2d_uint8():
    with pytest.raises(ValueError, match=r"codes must be 2-D \[n, d\], got shape \(4,\)"):
        pack_codes(np.zeros(4, np.uint8), 2)
    with pytest.raises(TypeError, match="codes must be uint8, got int64"):
        pack_codes(np.zeros((1, 4), np.int64), 2)


@pytest.mark.parametrize(
    "packed",
    [np.zeros((2, 3), np.uint8), np.zeros((2, 2), np.int16), np.zeros(2, np.uint8)],
)
def test_unpack_rejects_the_wrong_width_dtype_or_rank(packed):
    with pytest.raises(ValueError, match=r"packed codes must be uint8 \[n, 2\] for dim=5, bits=3"):
        unpack_codes(packed, 5, 3)

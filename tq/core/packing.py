"""Bit packing of b-bit codes and sign bits into bytes (the layout every kernel shares).

Layout: each vector's row is one little-endian bit stream. Code j of a row occupies bits
[j*b, (j+1)*b) of the stream, least significant bit first; bit k of the stream is bit (k % 8)
of byte (k // 8). A row takes ceil(d*b / 8) bytes; unused high bits of the last byte are zero.
Sign bits are the same layout with b = 1 (bit set = +1, clear = -1).

These are the obviously correct NumPy versions; the kernels fuse the same layout into their
loops and are tested against these.
"""

from __future__ import annotations

import numpy as np


def code_bytes(dim: int, bits: int) -> int:
    """Bytes per packed row of ``dim`` codes at ``bits`` bits each."""
    return (dim * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes uint8 [n, d] (each < 2^bits) into uint8 [n, code_bytes(d, bits)]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [n, d], got shape {codes.shape}")
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code is {int(codes.max())}, which does not fit in {bits} bits")
    n, dim = codes.shape
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((codes[:, :, None] >> shifts) & 1).astype(np.uint8).reshape(n, dim * bits)
    return np.packbits(stream, axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, dim: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 [n, code_bytes(dim, bits)] -> uint8 [n, dim]."""
    packed = np.asarray(packed)
    expected = code_bytes(dim, bits)
    if packed.ndim != 2 or packed.shape[1] != expected or packed.dtype != np.uint8:
        raise ValueError(
            f"packed codes must be uint8 [n, {expected}] for dim={dim}, bits={bits}, "
            f"got {packed.dtype} {packed.shape}"
        )
    n = packed.shape[0]
    stream = np.unpackbits(packed, axis=1, count=dim * bits, bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (stream.reshape(n, dim, bits) * weights).sum(axis=2).astype(np.uint8)


def pack_signs(positive: np.ndarray) -> np.ndarray:
    """Pack bool [n, d] (True = +1) into uint8 [n, ceil(d / 8)]."""
    return pack_codes(np.asarray(positive, dtype=np.uint8), 1)


def unpack_signs(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_signs`: float32 [n, dim] of +-1."""
    bits = unpack_codes(packed, dim, 1)
    return np.where(bits == 1, 1.0, -1.0).astype(np.float32)


def padding_is_zero(packed: np.ndarray, dim: int, bits: int) -> bool:
    """Whether the unused high bits of each row's last byte are all zero."""
    used = (dim * bits) % 8
    if used == 0 or packed.shape[0] == 0:
        return True
    return not np.any(packed[:, -1] >> used)

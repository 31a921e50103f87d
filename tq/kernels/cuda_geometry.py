"""The row tile of tq's numba.cuda encode, decode and rotation kernels
(:mod:`tq.kernels.cuda_codec`): how rows of d coordinates map onto a block of threads.

A block of ``THREADS`` (128) threads works on ``rows`` rows; each row belongs to ``group`` (G)
threads, each holding ``per_thread`` (E) of its coordinates in registers (``G * E`` is d rounded
up to a multiple of 8G; the padding is zero). A thread holds either the strided coordinates
g + G*m (coalesced loads and stores) or the contiguous ones g*E + m (whole code bytes: E*b bits
are whole bytes); the block's one shared-memory tile [rows, G*E] switches between the two.
Hadamard rotations run the Walsh-Hadamard butterflies of span >= G in registers in the strided
layout and those of span < G in the contiguous one (one pass through shared memory); Haar
rotations multiply the tile in place by a zero-padded [padded, padded] matrix, staged in shared
memory a k-tile of rows at a time (read from global memory for padded > 2048).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from tq.kernels.cuda_device import THREADS, pow2_ceil, pow2_floor

__all__ = ["geometry", "k_buffer_size", "tile_blocks"]

_STAGED_FLOATS = 2048  # matrix rows staged per k-tile: at most this many floats (8 KiB)


@functools.cache
def geometry(dim: int) -> SimpleNamespace:
    """How rows of ``dim`` coordinates map onto a block (all sizes in coordinates or floats).

    group G: threads per row, about sqrt(d) (at least 8 coordinates each); padded: d rounded up
    to a multiple of 8G; per_thread E = padded / G (a multiple of 8, at most 64; E >= G when d is
    a power of two, as the Walsh-Hadamard split needs).
    rows = THREADS / G. The matmul gives thread t the micro-tile rows ty + TY*i (i < mr) by
    columns tx + TX*j (j < mc), tx = t % TX, ty = t // TX, mr * mc = E. The shared tile stores
    (r, j) at r * stride + j + j // 32 (a skew that spreads both layouts' accesses over banks).
    """
    top = pow2_ceil(dim)
    group = max(1, min(1 << ((top.bit_length() - 1) // 2), top // 8))
    padded = -(-dim // (8 * group)) * 8 * group
    per_thread = padded // group
    rows = THREADS // group
    mr = 4 if rows % 4 == 0 else 2 if rows % 2 == 0 else 1
    staged = padded <= _STAGED_FLOATS
    stride = padded + padded // 32 if padded >= 32 else padded + 1
    return SimpleNamespace(
        group=group,
        padded=padded,
        per_thread=per_thread,
        rows=rows,
        mr=mr,
        mc=per_thread // mr,
        tx=group * mr,
        ty=rows // mr,
        staged=staged,
        k_tile=min(32, pow2_floor(_STAGED_FLOATS // padded), padded & -padded) if staged else 1,
        stride=stride,
        tile=rows * stride,
    )


def k_buffer_size(dim: int) -> int:
    """Floats of the shared k-tile buffer ``matmul`` stages the matrix in (1 when it reads the
    matrix from global memory, for padded > 2048)."""
    geo = geometry(dim)
    return geo.k_tile * geo.padded if geo.staged else 1


def tile_blocks(n: int, dim: int) -> int:
    """Blocks that cover n rows of ``dim`` coordinates."""
    return -(-n // geometry(dim).rows)

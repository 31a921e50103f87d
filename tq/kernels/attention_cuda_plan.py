"""What the CUDA decode attention kernels (:mod:`tq.kernels.attention_cuda_kernels`) are compiled
for, chosen on the host: the parts of a stream they walk (:class:`Part`: a quantized channel group
or the exact tokens), how a part's tokens map onto a block's threads, the shared memory that
needs, and the :class:`Spec` of one attend kernel with the :func:`plan` that picks its query
tile and token split.

Thread layout of a part. A token's row is shared by G threads (a power of two), each owning
chunks of ``CHUNK`` (8) coordinates, g + G * s for s < per_thread (the chunk's b bytes: one
uint32 load at 4 bits; the G threads of a token read adjacent words, so a warp's loads together
use every byte of the sectors they fetch, each byte once); THREADS / G tokens are worked on at
once. Per-thread registers bound per_thread: about 64 floats of queries (or value sums) per part.

The device layout (:mod:`tq.kernels.attention_cuda` writes it, the attend kernel reads it): a
``layout`` int64 array holds the token count n, the quantized key and value token counts, then
``LAYOUT_SLOTS`` offsets (codes and signs in uint32 words; scales and weights in floats) for each
of ``MAX_GROUPS`` key group slots and as many value group slots (zeros for unused slots), then
the float offsets of the exact keys and the exact values. The centroids of every group (keys'
then values', in order) start the float buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from tq.core.packing import code_bytes
from tq.kernels.cuda_device import THREADS, multiprocessors, pow2_ceil, pow2_floor

__all__ = [
    "CHUNK",
    "LAYOUT_SLOTS",
    "MAX_GROUPS",
    "REDUCE_SLICE",
    "Part",
    "PartGeometry",
    "Spec",
    "part_geometry",
    "plan",
    "scratch_floats",
]

CHUNK = 8  # coordinates per chunk: 8 codes are b whole bytes
REDUCE_SLICE = 32  # value registers per thread summed over the rows at once (16 KiB of shared)
LAYOUT_SLOTS = 4  # layout entries per quantized part: codes, signs, scales, weights offsets
MAX_GROUPS = 2  # channel groups per stream (tq.cache.kvcache.split_widths)
_REGISTERS = 64  # floats of query (or accumulator) registers per thread and part
_MAX_CHUNKS_PER_THREAD = 4
_TILE_TOKENS = 32  # tokens per scores tile, at least one per thread row
_MAX_QUERY_TILE = 8
_SHARED_FLOATS = 11 * 1024  # 44 KiB of shared memory per block
_MAX_SPLIT = 2048  # tokens per block times QT
_MIN_SPLIT = 32
_BLOCKS_PER_SM = 32  # the default split aims at this many blocks per multiprocessor
_MAX_GRID_Z = 65535  # query tiles per grid (its z dimension)


@dataclass(frozen=True)
class Part:
    """A channel group of ``size`` coordinates (bits 1..8; prod: MSE codes plus QJL signs) or the
    exact tokens (bits 0, size head_dim)."""

    size: int
    bits: int
    prod: bool = False

    @property
    def chunks(self) -> int:
        """Chunks of 8 coordinates per token (the last one zero-padded)."""
        return -(-self.size // CHUNK)

    @property
    def padded(self) -> int:
        """The coordinates rounded up to whole chunks."""
        return self.chunks * CHUNK

    @property
    def width(self) -> int:
        """Columns in the rotated query / value-sum layout: the padded coordinates (twice for Prod)."""
        return self.padded * (2 if self.prod else 1)

    @property
    def code_words(self) -> int:
        """uint32 words of a token's codes."""
        return -(-code_bytes(self.size, self.bits) // 4)

    @property
    def sign_words(self) -> int:
        """uint32 words of a token's QJL sign bits."""
        return -(-self.size // 32)


@dataclass(frozen=True)
class PartGeometry:
    """How a part's rows map onto a block: ``group`` threads per token (a power of two), each
    owning chunks g + group * s (s < ``per_thread``); ``rows`` = THREADS / group tokens at once;
    a scores tile is ``tile`` = rows * unroll tokens."""

    group: int
    per_thread: int
    rows: int
    unroll: int

    @property
    def tile(self) -> int:
        return self.rows * self.unroll


def part_geometry(part: Part, queries: int) -> PartGeometry:
    """The thread layout of ``part`` for a tile of ``queries`` queries: as many chunks per thread
    as the registers allow (at most 4), the fewest threads per token that cover its chunks."""
    factor = 2 if part.prod else 1
    per_thread = max(1, min(_MAX_CHUNKS_PER_THREAD, _REGISTERS // (CHUNK * queries * factor)))
    group = min(THREADS, pow2_ceil(-(-part.chunks // per_thread)))
    per_thread = -(-part.chunks // group)
    rows = THREADS // group
    return PartGeometry(group, per_thread, rows, max(1, _TILE_TOKENS // rows))


def scratch_floats(parts: list[Part], queries: int) -> int:
    """Shared floats the parts need: scores partials, value tree reduction, softmax statistics."""
    need = 2 * queries * THREADS
    for part in parts:
        geo = part_geometry(part, queries)
        need = max(need, queries * geo.tile * (geo.group + 1))
        registers = queries * geo.per_thread * CHUNK * (2 if part.prod else 1)
        need = max(need, min(registers, REDUCE_SLICE) * THREADS)
    return need


@dataclass(frozen=True)
class Spec:
    """Everything the attend kernel is compiled for (token counts and offsets are runtime)."""

    dim: int
    keys: tuple[Part, ...]
    values: tuple[Part, ...]
    exact_keys: bool
    exact_values: bool
    queries: int  # QT
    split: int  # tokens per block

    @property
    def exact(self) -> Part:
        return Part(self.dim, 0)

    @property
    def key_width(self) -> int:
        return sum(part.width for part in self.keys)

    @property
    def value_width(self) -> int:
        return sum(part.width for part in self.values)

    @property
    def query_width(self) -> int:
        return self.key_width + self.exact.padded

    @property
    def partial_width(self) -> int:
        return self.value_width + (self.exact.padded if self.exact_values else 0)

    @property
    def levels(self) -> int:
        return sum(1 << part.bits for part in (*self.keys, *self.values))

    def shared_floats(self) -> int:
        parts = [*self.keys, *self.values, self.exact]
        qt = self.queries
        return qt * (self.query_width + self.split) + self.levels + scratch_floats(parts, qt)


def plan(
    dim: int,
    keys: tuple[Part, ...],
    values: tuple[Part, ...],
    exact_keys: bool,
    exact_values: bool,
    *,
    tokens: int,
    kv_heads: int,
    queries: int,
    split_tokens: int | None,
) -> Spec:
    """The attend kernel's :class:`Spec` for ``queries`` (m) queries per KV head over ``tokens``
    tokens of ``kv_heads`` heads: the query tile (the largest power of two <= 8 whose shared arrays
    fit a block) and the split length (``split_tokens``, or by default one that gives each
    multiprocessor about 32 blocks).

    Raises:
        ValueError: a split_tokens out of range, a head_dim too large for a block's shared
            memory, or more query tiles than a grid dimension holds.
    """
    tile = min(_MAX_QUERY_TILE, pow2_ceil(queries))
    while True:
        limit = max(_MAX_SPLIT // tile, _MIN_SPLIT)
        if split_tokens is not None:
            if not 1 <= split_tokens <= limit:
                raise ValueError(f"split_tokens must be in [1, {limit}] here, got {split_tokens}")
            split = split_tokens
        else:
            blocks = tokens * kv_heads * -(-queries // tile)
            per_split = pow2_floor(max(1, blocks // (_BLOCKS_PER_SM * multiprocessors())))
            split = min(max(per_split, _MIN_SPLIT), limit)
        spec = Spec(dim, keys, values, exact_keys, exact_values, tile, split)
        if spec.shared_floats() <= _SHARED_FLOATS:
            break
        if tile == 1:
            raise ValueError(
                f"head_dim {dim} needs more shared memory than a block has "
                f"({4 * spec.shared_floats()} > {4 * _SHARED_FLOATS} bytes)"
            )
        tile //= 2
    if -(-queries // tile) > _MAX_GRID_Z:
        raise ValueError(f"too many queries per KV head ({queries}): at most {_MAX_GRID_Z * tile}")
    return spec

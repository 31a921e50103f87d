"""The cache strategies, one registry: how a stream of keys or values can be stored.

Every place that names strategies reads :data:`STRATEGIES`: :class:`tq.cache.config.CacheConfig`
checks widths against it, the stores (:mod:`tq.cache.kvcache`) build their quantizers from it,
attention from the packed codes (:mod:`tq.cache.packed_view`) asks it what it can read, the CLI
offers its names, and a test holds the config schema's enum and the report's labels to it.

Adding a strategy is one :class:`Strategy` entry here (with its quantizer in :mod:`tq.quant`):
its name, a short label, its family, the widths it takes, and its stored-bytes accounting.

Stored bytes per vector (:meth:`Strategy.vector_bytes`) count what one token of one head costs in
the quantized store once whole groups have left the exact window, for a ``dim``-channel group:
packed codes rounded up to whole bytes per vector, plus

- TurboQuant ("mse", "prod"): the vector norm at ``norm_dtype`` (2 or 4 bytes); Prod also the
  QJL sign bits (``ceil(dim / 8)`` bytes) and the residual norm gamma (4 bytes). A fractional
  width is two channel groups, each with its own codes and norm.
- "uniform", "rotated-uniform" and "kivi" values: a float16 zero point and scale per
  ``group_size`` channels; "kivi" keys: a float16 zero point and scale per channel for every
  ``group_size`` tokens (``4 * dim / group_size`` bytes per vector).
- "fp8": one byte per coordinate, plus a float16 scale per vector (``fp8_scale`` "token").
- "exact": float32 coordinates.

What a layer stores once, not per token (a centred stream's mean key, an fp8 per-head scale,
the outlier channel indices of a fractional width), is not in it; ``nbytes`` of a cache counts
both (a test holds the two to each other).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tq.core.packing import code_bytes
from tq.quant.fp8 import FP8Quantizer, shared_fp8_quantizer
from tq.quant.uniform import shared_uniform_quantizer

if TYPE_CHECKING:
    from tq.cache.config import CacheConfig

FAMILIES = ("exact", "turboquant", "uniform", "fp8")


@dataclass(frozen=True)
class Strategy:
    """One way of storing a stream.

    Attributes:
        name: the name configs, the CLI and records use.
        label: its name in the report's tables and sentences ("TurboQuant MSE").
        family: one of :data:`FAMILIES` (reports colour by it).
        description: one line for help texts.
        min_bits: the lowest width it takes (exact: ignored).
        whole_bits: fractional widths are refused.
        fixed_bits: the only width it takes (fp8: 8), or None.
        outlier_groups: TurboQuant's layout: a fractional width splits the channels into an
            outlier group and the rest, fixed from the first tokens; quantizers are shared by
            every layer of a configuration.
        norms: stores a norm per vector (``norm_dtype`` and ``renormalize`` apply).
        rotates: uses the cache's rotation (Hadamard needs power-of-two channel groups).
        packed_attention: attention from the packed codes reads it
            (:mod:`tq.cache.attention`).
        single_quantizer: for the strategies with one quantizer over all channels from the
            first token, ``(part, head_dim, bits, seed, config) -> quantizer``; None otherwise.
    """

    name: str
    label: str
    family: str
    description: str
    min_bits: int = 1
    whole_bits: bool = False
    fixed_bits: int | None = None
    outlier_groups: bool = False
    norms: bool = False
    rotates: bool = False
    packed_attention: bool = False
    single_quantizer: Callable[[str, int, int, int, CacheConfig], Any] | None = None

    @property
    def quantizes(self) -> bool:
        """False for "exact" (float32, never quantized)."""
        return self.family != "exact"

    def width_problem(self, bits: float) -> str | None:
        """Why ``bits`` bits per coordinate are not a width of this strategy (None if they are)."""
        if not self.quantizes:
            return None
        if self.fixed_bits is not None and bits != self.fixed_bits:
            return f"must be {self.fixed_bits} for {self.name}"
        if not self.min_bits <= bits <= 8:
            return f"must be in [{self.min_bits}, 8] for {self.name}"
        if self.whole_bits and not float(bits).is_integer():
            return f"must be a whole number for {self.name} (fractional widths are TurboQuant only)"
        return None

    def vector_bytes(self, part: str, dim: int, bits: int, config: CacheConfig) -> float:
        """Stored bytes of one vector of a ``dim``-channel group at ``bits`` bits (see the
        module docstring); ``part`` is "key" or "value"."""
        if not self.quantizes:
            return 4.0 * dim
        if self.family == "turboquant":
            norm = 2 if config.norm_dtype == "float16" else 4
            if self.name == "prod":
                return code_bytes(dim, bits - 1) + math.ceil(dim / 8) + norm + 4
            return code_bytes(dim, bits) + norm
        if self.family == "fp8":
            return dim + (2 if config.fp8_scale == "token" else 0)
        if self.name == "kivi" and part == "key":
            return code_bytes(dim, bits) + 4 * dim / config.group_size
        return code_bytes(dim, bits) + 4 * math.ceil(dim / config.group_size)


def _uniform_quantizer(
    rotated: bool = False, channel_keys: bool = False
) -> Callable[[str, int, int, int, CacheConfig], Any]:
    """A baseline's quantizer: per token (keys per channel when ``channel_keys``), after the
    cache's rotation when ``rotated``."""

    def make(part: str, head_dim: int, bits: int, seed: int, config: CacheConfig) -> Any:
        axis = "channel" if channel_keys and part == "key" else "token"
        rotation = (seed, config.rotation) if rotated else None
        return shared_uniform_quantizer(head_dim, bits, config.group_size, axis, rotation)

    return make


def _fp8_quantizer(part: str, head_dim: int, bits: int, seed: int, config: CacheConfig) -> FP8Quantizer:
    return shared_fp8_quantizer(head_dim, "token" if config.fp8_scale == "token" else None)


STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        Strategy(
            "mse", "TurboQuant MSE", "turboquant", "rotation, then a Lloyd-Max codebook per coordinate",
            outlier_groups=True, norms=True, rotates=True, packed_attention=True,
        ),
        Strategy(
            "prod", "TurboQuant Prod", "turboquant", "MSE at bits-1 plus a 1-bit QJL sign of the residual",
            min_bits=2, outlier_groups=True, norms=True, rotates=True, packed_attention=True,
        ),
        Strategy("exact", "exact", "exact", "float32, not quantized", packed_attention=True),
        Strategy(
            "uniform", "uniform", "uniform", "asymmetric uniform per token, groups of group_size channels",
            whole_bits=True, single_quantizer=_uniform_quantizer(),
        ),
        Strategy(
            "rotated-uniform", "rotation + uniform", "uniform", "the rotation, then uniform per token",
            whole_bits=True, rotates=True, single_quantizer=_uniform_quantizer(rotated=True),
        ),
        Strategy(
            "kivi", "KIVI-style", "uniform", "KIVI-style: keys per channel, values per token",
            whole_bits=True, single_quantizer=_uniform_quantizer(channel_keys=True),
        ),
        Strategy(
            "fp8", "FP8 E4M3", "fp8", "FP8 E4M3 per coordinate, scaled per token or per head (fp8_scale)",
            fixed_bits=8, single_quantizer=_fp8_quantizer,
        ),
    )
}  # fmt: skip

STRATEGY_NAMES = tuple(STRATEGIES)
# The strategies of the quantizer-level (synthetic) workload: the TurboQuant quantizers.
QUANTIZER_STRATEGIES = tuple(name for name, s in STRATEGIES.items() if s.family == "turboquant")

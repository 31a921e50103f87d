"""How a KV cache stores its keys and values: :class:`CacheConfig`, one layer's settings, and
the helpers that read it (channel groups of a fractional width, exact-layer overrides).

The strategies it names are :data:`tq.cache.strategies.STRATEGIES`; the stores that follow it
are in :mod:`tq.cache.kvcache`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tq.cache.strategies import STRATEGIES, STRATEGY_NAMES
from tq.kernels import DEVICES

NORM_DTYPES = ("float32", "float16")
FP8_SCALES = ("token", "head")


@dataclass(frozen=True)
class CacheConfig:
    """How one layer's keys and values are stored.

    Attributes:
        key_bits, value_bits: average bits per coordinate; a fractional width such as 2.5
            splits the channels into an outlier group at ceil(bits) and the rest at floor(bits),
            sized so that the average is exact (bits * head_dim must be an integer).
        key_strategy, value_strategy: a name of :data:`tq.cache.strategies.STRATEGIES`: "mse"
            (TurboQuant MSE), "prod" (TurboQuant Prod: MSE at bits-1 plus a 1-bit QJL sign),
            "exact" (fp32, bits ignored), a baseline of tq.quant.uniform (whole bits 1..8 only):
            "uniform" (per-token asymmetric uniform, groups of group_size channels),
            "rotated-uniform" (the same after the rotation) or "kivi" (keys per channel over
            groups of group_size tokens, values per token), or "fp8" (FP8 E4M3 per coordinate,
            tq.quant.fp8; bits must be 8; scaled as fp8_scale says).
        residual_length: the most recent tokens kept exact; older tokens leave this window
            into the quantized store. Per-channel ("kivi") keys leave it in whole groups of
            group_size tokens, so their exact part holds residual_length to
            residual_length + group_size - 1 tokens; values always leave it token by token.
        renormalize: rescale each reconstruction to its stored norm (TurboQuant streams only;
            the baselines store no norms and ignore it).
        norm_dtype: "float32" or "float16" (refused for a norm beyond the float16 range);
            TurboQuant streams only (baselines always store float16 zero points and scales).
        seed: seed of the keys' rotation (values use seed + 1); every layer shares them, so one
            decode step quantizes all layers of a model in one kernel call per stream.
        rotation: "haar" or "hadamard" (Hadamard needs power-of-two group sizes), for
            TurboQuant and "rotated-uniform".
        device: where quantization runs, "cpu", "cuda" or "auto" (tq.kernels.resolve_device);
            the cache's arrays live in host memory either way. The baselines run in NumPy on
            the CPU whatever the device.
        group_size: baselines only (>= 2): channels per zero point and scale for per-token
            quantization (the last group is shorter if it does not divide head_dim), tokens
            per group for per-channel keys. Stored bits per coordinate: bits + 32 / group_size
            when it divides head_dim.
        center_keys: subtract a per-head mean key (one fp32 value per channel, the mean of the
            first tokens that enter the layer's cache, i.e. the prefill) before quantizing the
            keys, and add it back on reconstruction, so that attention scores change only by
            the quantization error of the centred keys. Stored: kv_heads * head_dim fp32 per
            layer. Ignored for exact keys.
        fp8_scale: scale of an "fp8" stream: "token" (a float16 scale per token and head,
            max |x| / 448) or "head" (one fp32 scale per head, fixed from the first tokens
            that enter the cache; later values beyond its range saturate at +-448 * scale).
    """

    key_bits: float = 4
    value_bits: float = 4
    key_strategy: str = "mse"
    value_strategy: str = "mse"
    residual_length: int = 0
    renormalize: bool = False
    norm_dtype: str = "float32"
    seed: int = 0
    rotation: str = "haar"
    device: str = "cpu"
    group_size: int = 32
    center_keys: bool = False
    fp8_scale: str = "token"

    def __post_init__(self) -> None:
        for part in ("key", "value"):
            name = getattr(self, f"{part}_strategy")
            if name not in STRATEGIES:
                raise ValueError(f"{part}_strategy must be one of {STRATEGY_NAMES}, got {name!r}")
            bits = getattr(self, f"{part}_bits")
            if isinstance(bits, bool) or not isinstance(bits, (int, float, np.integer, np.floating)):
                raise TypeError(f"{part}_bits must be a number, got {bits!r}")
            problem = STRATEGIES[name].width_problem(bits)
            if problem is not None:
                raise ValueError(f"{part}_bits {problem}, got {bits}")
        if isinstance(self.residual_length, bool) or not isinstance(self.residual_length, int):
            raise TypeError(f"residual_length must be an integer, got {self.residual_length!r}")
        if self.residual_length < 0:
            raise ValueError(f"residual_length must be >= 0, got {self.residual_length}")
        if self.norm_dtype not in NORM_DTYPES:
            raise ValueError(f"norm_dtype must be one of {NORM_DTYPES}, got {self.norm_dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)):
            raise TypeError(f"group_size must be an integer, got {self.group_size!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if not isinstance(self.center_keys, (bool, np.bool_)):
            raise TypeError(f"center_keys must be true or false, got {self.center_keys!r}")
        if self.fp8_scale not in FP8_SCALES:
            raise ValueError(f"fp8_scale must be one of {FP8_SCALES}, got {self.fp8_scale!r}")

    def describe(self) -> dict[str, Any]:
        """The configuration as a plain dict (for result records)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def split_widths(bits: float, head_dim: int) -> list[tuple[int, int]]:
    """Channel groups [(bits, channels), ...] for an average width, outlier group first.

    An integer width is one group; 2.5 at head_dim 128 is [(3, 64), (2, 64)].
    """
    low = math.floor(bits)
    if low == bits:
        return [(int(bits), head_dim)]
    outliers = (bits - low) * head_dim
    if abs(outliers - round(outliers)) > 1e-9:
        raise ValueError(
            f"a fractional width needs bits * head_dim to be an integer, got {bits} * {head_dim}"
        )
    return [(low + 1, round(outliers)), (low, head_dim - round(outliers))]


EXACT = CacheConfig(key_strategy="exact", value_strategy="exact")  # keys and values kept as fp32


def exact_layers(
    num_layers: int, first: int = 0, last: int = 0, layers: Sequence[int] = ()
) -> dict[int, CacheConfig]:
    """Overrides that keep layers' keys and values exact: the first ``first``, the last ``last``
    and every layer in ``layers`` (any set, e.g. the layers whose keys carry a large offset).

    Raises:
        ValueError: a layer of ``layers`` is outside 0 .. num_layers - 1.
    """
    outside = sorted({int(layer) for layer in layers if not 0 <= int(layer) < num_layers})
    if outside:
        raise ValueError(f"exact layers {outside} are outside the model's layers 0..{num_layers - 1}")
    chosen = set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers))
    chosen |= {int(layer) for layer in layers}
    return {layer: EXACT for layer in sorted(chosen)}

"""Quantized KV caches: one layer (``QuantizedKVCache``) and a whole model (``MultiHeadKVCache``).

A layer's cache holds keys and values of shape [kv_heads, seq, head_dim]. Each token is
quantized once, when it enters the quantized store, and never again: the reconstruction of
earlier tokens does not change as the cache grows.

What is stored for a quantized token (and counted in ``nbytes``): the packed codes, the vector
norm (``norm_dtype``, fp32 by default), and for Prod the QJL sign bits and the residual norm
gamma (fp32); for a fractional width, each channel group has its own codes and norm, and the
outlier channel indices of each head are stored once. For the baseline strategies
(tq.quant.uniform: "uniform", "rotated-uniform", "kivi"): the packed codes and a float16 zero point
and scale per group. For "fp8" (tq.quant.fp8): one byte per coordinate and a float16 scale per token
(or one fp32 scale per head). With ``center_keys``, each head's mean key (fp32, one value per
channel) is stored once per layer. ``exact`` tokens and the tokens of the residual window are stored as fp32.
``keys()`` and ``values()`` return a float32 reconstruction that the cache maintains as tokens
arrive (a working buffer for the decode loop, not counted in ``nbytes``; ``buffer_nbytes``);
``dequantize_stored()`` rebuilds it from the stored codes alone. A cache made with
``keep_reconstruction=False`` keeps no float copy of its quantized tokens (only the exact
window): attention reads the packed codes (:func:`tq.cache.attention.decode_attention`), and
``keys()`` / ``values()`` rebuild from the codes on each call.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from tq.cache.config import CacheConfig
from tq.cache.stream import StreamStore, quantize_spans
from tq.quant.turboquant import FLOAT32_MAX, float32_overflow


class QuantizedKVCache:
    """One layer's KV cache, keys and values [kv_heads, seq, head_dim], quantized on entry.

    Args:
        kv_heads: key/value heads of the layer (GQA heads are not repeated).
        head_dim: dimension of each head's vectors.
        config: bit widths, strategies and options (:class:`CacheConfig`).
        layer: the layer's index (reported in summaries).
        keep_reconstruction: keep a float32 copy of the quantized tokens' reconstruction for
            ``keys()`` / ``values()`` (True, the decode loop's working buffer), or only the
            exact window (False: attention reads the packed codes, ``keys()`` rebuilds).
    """

    def __init__(
        self,
        kv_heads: int,
        head_dim: int,
        config: CacheConfig | None = None,
        layer: int = 0,
        keep_reconstruction: bool = True,
    ) -> None:
        if kv_heads < 1 or head_dim < 2:
            raise ValueError(f"need kv_heads >= 1 and head_dim >= 2, got {kv_heads} and {head_dim}")
        self.config = config or CacheConfig()
        self.layer = layer
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        seed = self.config.seed
        c = self.config
        self.keep_reconstruction = keep_reconstruction
        self._keys = StreamStore(kv_heads, head_dim, "key", seed, c, keep_reconstruction)
        self._values = StreamStore(kv_heads, head_dim, "value", seed + 1, c, keep_reconstruction)

    def __repr__(self) -> str:
        return f"QuantizedKVCache(layer={self.layer}, seq={len(self)}, config={self.config})"

    def __len__(self) -> int:
        return self._keys.length

    def copy(self) -> QuantizedKVCache:
        """An independent copy (its stored batches copied, its quantizers shared)."""
        quantizers = [group.quantizer for store in (self._keys, self._values) for group in store.groups]
        return copy.deepcopy(self, {id(quantizer): quantizer for quantizer in quantizers})

    def _check(self, name: str, tokens: np.ndarray, store: StreamStore) -> np.ndarray:
        """Refuse new tokens [kv_heads, t, head_dim] of the wrong type or shape, with NaN or inf,
        with a float64 value beyond float32 (the cache computes in float32), or that ``store``
        cannot hold; every message names the layer, and the head, token and channel of a value."""
        name = f"layer {self.layer} {name}"
        if not isinstance(tokens, np.ndarray) or tokens.dtype not in (np.float32, np.float64, np.float16):
            raise TypeError(
                f"{name} must be a float numpy array, got {getattr(tokens, 'dtype', type(tokens))}"
            )
        if tokens.ndim != 3 or tokens.shape[0] != self.kv_heads or tokens.shape[2] != self.head_dim:
            raise ValueError(
                f"{name} must have shape [{self.kv_heads}, new_tokens, {self.head_dim}], "
                f"got {list(tokens.shape)}"
            )
        overflow = float32_overflow(tokens)
        if overflow is not None:
            (head, token, channel), value = overflow
            raise ValueError(
                f"{name}: {value:.6g} (head {head}, new token {token}, channel {channel}) overflows "
                f"float32 (max {FLOAT32_MAX:.6g}), the precision the cache computes in"
            )
        tokens = np.ascontiguousarray(tokens, dtype=np.float32)
        bad = ~np.isfinite(tokens)
        if bad.any():
            head, token, channel = (int(i) for i in np.argwhere(bad)[0])
            value = "NaN" if np.isnan(tokens[head, token, channel]) else "inf"
            raise ValueError(f"{name} contain {value} (head {head}, new token {token}, channel {channel})")
        store.check(name, tokens)
        return tokens

    def check(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate new tokens; return them as C-contiguous float32."""
        keys = self._check("keys", keys, self._keys)
        values = self._check("values", values, self._values)
        if keys.shape[1] != values.shape[1]:
            raise ValueError(f"keys have {keys.shape[1]} new tokens but values have {values.shape[1]}")
        return keys, values

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add new tokens: keys and values float [kv_heads, new_tokens, head_dim]."""
        append_each([self], [keys], [values])

    def _push(self, keys: np.ndarray, values: np.ndarray) -> list[tuple[StreamStore, slice]]:
        """Add checked tokens to both streams; return the spans waiting to be quantized."""
        spans = [
            (self._keys, self._keys.push(keys, self.config.residual_length)),
            (self._values, self._values.push(values, self.config.residual_length)),
        ]
        return [(store, span) for store, span in spans if span is not None]

    def keys(self) -> np.ndarray:
        """Float32 [kv_heads, seq, head_dim]: reconstructed keys, then the exact window (read-only;
        rebuilt from the codes on each call when the reconstruction is not kept)."""
        return self._keys.view()

    def values(self) -> np.ndarray:
        """Float32 [kv_heads, seq, head_dim]: reconstructed values, then the exact window (read-only;
        rebuilt from the codes on each call when the reconstruction is not kept)."""
        return self._values.view()

    def dequantize_stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of the quantized store rebuilt from stored codes: [kv_heads, q, d] each."""
        return self._keys.dequantize_stored(), self._values.dequantize_stored()

    @property
    def quantized_tokens(self) -> int:
        """Tokens that have left the exact window into the quantized store, in both streams
        (per-channel "kivi" keys leave it in whole groups, so they may lag the values)."""
        return min(self._keys.quantized, self._values.quantized)

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored for keys and values."""
        return self._keys.nbytes + self._values.nbytes

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of the float32 working buffers (not in ``nbytes``): the reconstruction and the
        exact window when the reconstruction is kept, else the exact window only."""
        return self._keys.buffer_nbytes + self._values.buffer_nbytes

    @property
    def float_nbytes(self) -> int:
        """Bytes the same tokens take as fp32 keys and values."""
        return 2 * len(self) * self.kv_heads * self.head_dim * 4

    def bits_per_coordinate(self) -> dict[str, float]:
        """Requested code bits per coordinate, and all stored bits per stored coordinate."""
        coordinates = max(len(self), 1) * self.kv_heads * self.head_dim
        return {
            "key_code_bits": self._keys.code_bits_per_coordinate,
            "value_code_bits": self._values.code_bits_per_coordinate,
            "key_stored_bits": 8 * self._keys.nbytes / coordinates,
            "value_stored_bits": 8 * self._values.nbytes / coordinates,
        }


class MultiHeadKVCache:
    """A model's cache: one :class:`QuantizedKVCache` per layer, from one configuration.

    Args:
        num_layers, kv_heads, head_dim: the model's cache geometry.
        config: the configuration of every layer ...
        layer_configs: ... except these layers (index -> config), e.g. from :func:`exact_layers`.
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        config: CacheConfig | None = None,
        layer_configs: dict[int, CacheConfig] | None = None,
    ) -> None:
        config = config or CacheConfig()
        layer_configs = dict(layer_configs or {})
        unknown = sorted(set(layer_configs) - set(range(num_layers)))
        if unknown:
            raise ValueError(f"layer overrides {unknown} are outside the model's layers 0..{num_layers - 1}")
        self.config = config
        self.layers = [
            QuantizedKVCache(kv_heads, head_dim, layer_configs.get(layer, config), layer=layer)
            for layer in range(num_layers)
        ]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> QuantizedKVCache:
        return self.layers[layer]

    def append(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Add new tokens to one layer: keys, values [kv_heads, new_tokens, head_dim]."""
        self.layers[layer].append(keys, values)

    def append_all(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Add new tokens to every layer at once (one decode step): keys[L], values[L] are
        [kv_heads, new_tokens, head_dim]. Layers that share a configuration are quantized in
        one kernel call per stream."""
        self._check_layers(keys, values)
        append_each(self.layers, keys, values)

    def _check_layers(self, keys: Sequence[np.ndarray], values: Sequence[np.ndarray]) -> None:
        if len(keys) != len(self.layers) or len(values) != len(self.layers):
            raise ValueError(
                f"need keys and values for all {len(self.layers)} layers, got {len(keys)} and {len(values)}"
            )

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def float_nbytes(self) -> int:
        return sum(layer.float_nbytes for layer in self.layers)

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: strategies, widths, tokens, bytes stored and fp32 bytes."""
        return [
            {
                "layer": index,
                "key": f"{layer.config.key_strategy}@{layer.config.key_bits}",
                "value": f"{layer.config.value_strategy}@{layer.config.value_bits}",
                "tokens": len(layer),
                "nbytes": layer.nbytes,
                "float_nbytes": layer.float_nbytes,
            }
            for index, layer in enumerate(self.layers)
        ]


def append_batch(
    caches: Sequence[MultiHeadKVCache], keys: list[np.ndarray], values: list[np.ndarray]
) -> None:
    """One decode step of several independent sequences, each with its own cache: keys[L] and
    values[L] are [len(caches), kv_heads, new_tokens, head_dim]. The same as
    ``caches[i].append_all([k[i] for k in keys], [v[i] for v in values])`` for every i, but
    caches that share a configuration are quantized in one kernel call per stream for all of them.
    """
    for name, arrays in (("keys", keys), ("values", values)):
        if any(array.shape[0] != len(caches) for array in arrays):
            raise ValueError(f"{name} must hold {len(caches)} sequences in their first axis")
    for cache in caches:
        cache._check_layers(keys, values)
    append_each(
        [layer for cache in caches for layer in cache.layers],
        [k[row] for row in range(len(caches)) for k in keys],
        [v[row] for row in range(len(caches)) for v in values],
    )


def append_each(
    caches: Sequence[QuantizedKVCache], keys: Sequence[np.ndarray], values: Sequence[np.ndarray]
) -> None:
    """Add keys[i] and values[i], float [kv_heads, new_tokens, head_dim], to caches[i] for every
    i (layers of a model, rows of a batch). Every input is checked before any is added; caches
    that share a configuration are quantized in one kernel call per stream for all of them."""
    if len(keys) != len(caches) or len(values) != len(caches):
        raise ValueError(
            f"need keys and values for all {len(caches)} caches, got {len(keys)} and {len(values)}"
        )
    checked = [cache.check(k, v) for cache, k, v in zip(caches, keys, values, strict=True)]
    pending = []
    for cache, (k, v) in zip(caches, checked, strict=True):
        pending.extend(cache._push(k, v))
    quantize_spans(pending)

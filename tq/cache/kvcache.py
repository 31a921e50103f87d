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
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tq.cache.config import CacheConfig, split_widths
from tq.cache.strategies import STRATEGIES
from tq.quant.batch import BatchQuantizedMSE
from tq.quant.fp8 import FP8_MAX, FP8Quantizer
from tq.quant.turboquant import FLOAT32_MAX, TurboQuantMSE, TurboQuantProd, float32_overflow
from tq.quant.uniform import BatchUniform, UniformQuantizer

_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class _Group:
    """Channels of every head quantized by one quantizer (TurboQuant or a baseline).

    ``channels`` int64 [kv_heads, size]: the head_dim indices of the group in each head.
    ``pieces``: one (batch, start, stop) per quantized span: rows start..stop-1 of a packed
    batch, which several layers' stores may share (one kernel call per decode step).
    """

    quantizer: TurboQuantMSE | TurboQuantProd | UniformQuantizer | FP8Quantizer
    channels: np.ndarray
    pieces: list[tuple[BatchQuantizedMSE | BatchUniform, int, int]] = field(default_factory=list)


@functools.cache
def _shared_quantizer(
    strategy: str, dim: int, bits: int, seed: int, rotation: str, device: str
) -> TurboQuantMSE | TurboQuantProd:
    """One quantizer per configuration, shared by every layer's cache that uses it."""
    quantizer_type = TurboQuantProd if strategy == "prod" else TurboQuantMSE
    return quantizer_type(dim, bits, seed=seed, normalize=True, rotation=rotation, device=device)


def _quantize_spans(pending: list[tuple[_Store, slice]]) -> None:
    """Quantize the spans that leave the exact window of several stores.

    Stores whose channel groups use the same quantizers (every layer of a model with one
    configuration) are quantized together: one kernel call per channel group and decode step,
    however many layers there are. Each store keeps its own slice of the packed batch.
    """
    buckets: dict[tuple, list[tuple[_Store, slice, np.ndarray]]] = {}
    for store, span in pending:
        tokens = store.to_quantized_space(store.buffer[:, store.local(span)])
        if not store.groups:
            store._make_groups(tokens)
        key = (
            tuple(id(g.quantizer) for g in store.groups),
            store.config.norm_dtype,
            store.config.renormalize,
        )
        buckets.setdefault(key, []).append((store, span, tokens))
    for members in buckets.values():
        lead = members[0][0]
        outs = [np.empty_like(tokens) for _, _, tokens in members]
        for index, group in enumerate(lead.groups):
            parts = [
                store._gather(store.groups[index], tokens).reshape(-1, group.channels.shape[1])
                for store, _, tokens in members
            ]
            batch = lead._store_norms(
                group.quantizer.quantize(np.concatenate(parts) if len(parts) > 1 else parts[0])
            )
            reconstruction = lead._reconstruct(group, batch)
            start = 0
            for (store, _, tokens), part, out in zip(members, parts, outs, strict=True):
                stop = start + len(part)
                store.groups[index].pieces.append((batch, start, stop))
                block = reconstruction[start:stop].reshape(store.kv_heads, tokens.shape[1], -1)
                store._scatter(store.groups[index], block, out)
                start = stop
        for (store, span, _), out in zip(members, outs, strict=True):
            store.absorb(span, store.from_quantized_space(out))


class _Store:
    """One stream (``part`` "key" or "value") of a layer: quantized store, exact window,
    reconstruction.

    TurboQuant streams fix their channel groups (outliers first) from the first tokens; a
    baseline or fp8 stream has one group of all channels and its quantizer from the start.
    The first tokens also fix the stream's per-head transform, applied before quantizing and
    undone on reconstruction: the mean key (``center``, centred keys) and the fp8 per-head
    scale (``head_scale``). Tokens
    leave the exact window in multiples of ``flush`` tokens: the quantizer's rows per group
    (group_size for per-channel keys, else 1), so per-channel groups never straddle heads or
    layers when several spans are quantized as one batch.

    ``buffer`` [kv_heads, capacity, head_dim] holds positions ``offset`` onwards: all tokens
    (reconstructed, then exact) when the reconstruction is kept, else only the exact window
    (``offset`` = ``quantized``).
    """

    def __init__(
        self,
        kv_heads: int,
        head_dim: int,
        part: str,
        seed: int,
        config: CacheConfig,
        keep_reconstruction: bool,
    ) -> None:
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.strategy = getattr(config, f"{part}_strategy")
        self.kind = kind = STRATEGIES[self.strategy]
        bits = getattr(config, f"{part}_bits")
        self.seed = seed
        self.config = config
        self.widths = split_widths(bits, head_dim) if kind.quantizes else []
        self.groups: list[_Group] = []
        self.flush = 1
        self.center: np.ndarray | None = None  # float32 [kv_heads, head_dim]
        self.head_scale: np.ndarray | None = None  # float32 [kv_heads]
        self.centered = part == "key" and config.center_keys and kind.quantizes
        if kind.single_quantizer is not None:
            quantizer = kind.single_quantizer(part, head_dim, int(bits), seed, config)
            self.groups.append(_Group(quantizer, np.tile(np.arange(head_dim), (kv_heads, 1))))
            self.flush = quantizer.rows_per_group
        self.keep_reconstruction = keep_reconstruction or not kind.quantizes
        self.quantized = 0  # tokens in the quantized store (the oldest ones)
        self.length = 0  # all tokens
        self.offset = 0  # the position of buffer[:, 0]
        self.buffer = np.empty((kv_heads, 0, head_dim), np.float32)

    def _fix_transform(self, tokens: np.ndarray) -> None:
        """Fix the per-head transform from the first tokens [kv_heads, t, head_dim]: the mean key
        of a centred stream, the per-head scale of an fp8 stream with fp8_scale "head"."""
        if self.centered:
            self.center = tokens.mean(axis=1, dtype=np.float64).astype(np.float32)
        if self.kind.family == "fp8" and self.config.fp8_scale == "head":
            shifted = tokens if self.center is None else tokens - self.center[:, None, :]
            peak = np.abs(shifted).max(axis=(1, 2)).astype(np.float64)
            self.head_scale = np.where(peak > 0, peak / FP8_MAX, 1.0).astype(np.float32)

    def to_quantized_space(self, tokens: np.ndarray) -> np.ndarray:
        """Tokens [kv_heads, t, head_dim] as the quantizer sees them: centred, per-head scaled
        (a contiguous float32 copy)."""
        out = np.array(tokens, dtype=np.float32, order="C")
        if self.center is not None:
            out -= self.center[:, None, :]
        if self.head_scale is not None:
            out /= self.head_scale[:, None, None]
        return out

    def from_quantized_space(self, rows: np.ndarray) -> np.ndarray:
        """Undo :meth:`to_quantized_space` on a reconstruction [kv_heads, t, head_dim] (in place)."""
        if self.head_scale is not None:
            rows *= self.head_scale[:, None, None]
        if self.center is not None:
            rows += self.center[:, None, :]
        return rows

    def local(self, span: slice) -> slice:
        """Positions start..stop-1 as a slice of ``buffer``."""
        return slice(span.start - self.offset, span.stop - self.offset)

    def absorb(self, span: slice, reconstruction: np.ndarray) -> None:
        """Positions ``span`` (the oldest exact ones) are now in the quantized store: keep their
        reconstruction [kv_heads, t, head_dim], or drop them from the buffer."""
        if self.keep_reconstruction:
            self.buffer[:, self.local(span)] = reconstruction
        else:  # keep the exact window only, in a buffer sized to it (a prefill leaves a large one)
            kept = self.buffer[:, self.local(slice(span.stop, self.length))]
            if self.buffer.shape[1] > max(4 * kept.shape[1], 64):
                self.buffer = np.empty((self.kv_heads, max(2 * kept.shape[1], 16), self.head_dim), np.float32)
            self.buffer[:, : kept.shape[1]] = kept
            self.offset = span.stop
        self.quantized = span.stop

    def exact(self) -> np.ndarray:
        """The exact tokens (the residual window, or all of an exact stream) [kv_heads, e, head_dim]."""
        return self.buffer[:, self.local(slice(self.quantized, self.length))]

    def check(self, name: str, tokens: np.ndarray) -> None:
        """Refuse finite tokens [kv_heads, t, head_dim] that this stream cannot store: a norm
        beyond float16 (TurboQuant, float16 norms) or a value beyond a baseline's range."""
        if self.kind.norms and self.config.norm_dtype == "float16":
            # in float64: a float32 vector's squared norm may overflow float32 (|x| > 1.8e19)
            norms = np.sqrt(np.einsum("htd,htd->ht", tokens, tokens, dtype=np.float64))
            if norms.max(initial=0.0) > _FLOAT16_MAX:
                head, token = np.unravel_index(np.argmax(norms), norms.shape)
                raise ValueError(
                    f"{name}: the norm {float(norms[head, token]):.6g} of a vector (head {head}, new "
                    f"token {token}) overflows float16 (max {_FLOAT16_MAX:g}), the norm_dtype of this "
                    "cache; use norm_dtype='float32'"
                )
        if self.kind.single_quantizer is not None:
            quantizer = self.groups[0].quantizer
            bad = quantizer.out_of_range(tokens.reshape(-1, self.head_dim))
            if bad is not None:
                head, token = divmod(bad[0], tokens.shape[1])
                what = "a vector norm" if quantizer.rotation is not None else "a value"
                raise ValueError(
                    f"{name}: {what} of {bad[1]:.6g} (head {head}, new token {token}) is beyond "
                    f"{quantizer.max_abs:g}, too large for the float16 scales of {self.strategy}"
                )

    def _ensure_capacity(self, length: int) -> None:
        """Room in ``buffer`` for positions up to ``length``."""
        needed, held = length - self.offset, self.length - self.offset
        if needed > self.buffer.shape[1]:
            capacity = max(needed, 2 * self.buffer.shape[1], 16)
            grown = np.empty((self.kv_heads, capacity, self.head_dim), np.float32)
            grown[:, :held] = self.buffer[:, :held]
            self.buffer = grown

    def _make_groups(self, tokens: np.ndarray) -> None:
        """Fix the channel groups from the first tokens: the largest mean |x| are outliers."""
        magnitude = np.mean(np.abs(tokens), axis=1)  # [kv_heads, head_dim]
        order = np.argsort(-magnitude, axis=1, kind="stable")
        start = 0
        for index, (bits, size) in enumerate(self.widths):
            channels = np.sort(order[:, start : start + size], axis=1)
            quantizer = _shared_quantizer(
                self.strategy, size, bits, self.seed + 1000 * index, self.config.rotation, self.config.device
            )
            self.groups.append(_Group(quantizer, channels))
            start += size

    def _store_norms(self, batch: BatchQuantizedMSE | BatchUniform) -> BatchQuantizedMSE | BatchUniform:
        """Round the norms to the stored precision (the fp16 range is checked on append)."""
        if self.config.norm_dtype == "float32" or batch.norms is None:
            return batch
        return replace(batch, norms=batch.norms.astype(np.float16).astype(np.float32))

    def _reconstruct(self, group: _Group, batch: BatchQuantizedMSE | BatchUniform) -> np.ndarray:
        """Dequantize one stored batch -> float32 [rows, group size], renormalized if asked
        (TurboQuant batches only: baseline batches have no norms)."""
        rows = group.quantizer.dequantize(batch)
        if self.config.renormalize and batch.norms is not None:
            lengths = np.linalg.norm(rows, axis=1)
            scale = np.where(lengths > 0, batch.norms / np.where(lengths > 0, lengths, 1.0), 0.0)
            rows = (rows * scale[:, None]).astype(np.float32)
        return rows

    def _gather(self, group: _Group, tokens: np.ndarray) -> np.ndarray:
        """The group's channels of tokens [kv_heads, t, head_dim] -> [kv_heads, t, size]."""
        if len(self.groups) == 1:
            return tokens
        index = np.broadcast_to(group.channels[:, None, :], (*tokens.shape[:2], group.channels.shape[1]))
        return np.take_along_axis(tokens, index, axis=2)

    def _scatter(self, group: _Group, part: np.ndarray, out: np.ndarray) -> None:
        """Write part [kv_heads, t, size] into the group's channels of out [kv_heads, t, head_dim]."""
        if len(self.groups) == 1:
            out[:] = part
            return
        index = np.broadcast_to(group.channels[:, None, :], part.shape)
        np.put_along_axis(out, index, part, axis=2)

    def push(self, tokens: np.ndarray, residual_length: int) -> slice | None:
        """Add tokens [kv_heads, t, head_dim]; return the span of positions that now leave the
        exact window and must be quantized (None if none do)."""
        t = tokens.shape[1]
        if self.length == 0 and t:
            self._fix_transform(tokens)
        self._ensure_capacity(self.length + t)
        self.buffer[:, self.local(slice(self.length, self.length + t))] = tokens
        self.length += t
        if not self.kind.quantizes:
            self.quantized = self.length
            return None
        leaving = self.length - residual_length - self.quantized
        leaving -= leaving % self.flush  # per-channel groups leave whole
        return slice(self.quantized, self.quantized + leaving) if leaving > 0 else None

    def view(self) -> np.ndarray:
        """All tokens [kv_heads, length, head_dim], read-only: the kept reconstruction, or one
        rebuilt from the codes."""
        if self.keep_reconstruction:
            out = self.buffer[:, : self.length]
        else:
            out = np.concatenate([self.dequantize_stored(), self.exact()], axis=1)
        out.flags.writeable = False
        return out

    def merge_pieces(self) -> None:
        """Replace each TurboQuant channel group's packed pieces (one per append) by one batch
        holding all quantized tokens, head-major like every piece: one copy of the packed
        bytes, after which readers see contiguous arrays."""
        if not self.kind.outlier_groups:
            return
        for group in self.groups:
            if len(group.pieces) < 2:
                continue
            lead = group.pieces[0][0]
            fields = {field.name: getattr(lead, field.name) for field in dataclasses.fields(lead)}
            for name in ("codes", "norms", "signs", "gammas"):
                parts = [getattr(batch, name, None) for batch, _, _ in group.pieces]
                if parts[0] is None:
                    continue
                blocks = [
                    part[start:stop].reshape(self.kv_heads, (stop - start) // self.kv_heads, -1)
                    for part, (_, start, stop) in zip(parts, group.pieces, strict=True)
                ]
                fields[name] = np.concatenate(blocks, axis=1).reshape(-1, *parts[0].shape[1:])
            batch = type(lead).from_kernel(**fields)
            group.pieces[:] = [(batch, 0, len(batch))]

    def dequantize_stored(self) -> np.ndarray:
        """The quantized tokens rebuilt from the stored codes alone: [kv_heads, quantized, d]."""
        out = np.zeros((self.kv_heads, self.quantized, self.head_dim), np.float32)
        if not self.kind.quantizes:
            out[:] = self.buffer[:, : self.quantized]  # exact streams keep every token from offset 0
            return out
        position = 0
        for pieces in zip(*(group.pieces for group in self.groups), strict=True):  # one per span
            t = (pieces[0][2] - pieces[0][1]) // self.kv_heads
            for group, (batch, start, stop) in zip(self.groups, pieces, strict=True):
                block = self._reconstruct(group, batch.rows(start, stop)).reshape(self.kv_heads, t, -1)
                self._scatter(group, block, out[:, position : position + t])
            position += t
        return self.from_quantized_space(out)

    @property
    def nbytes(self) -> int:
        """Bytes stored: quantized parts (codes, norms at norm_dtype, QJL signs and gammas, a
        baseline's zero points and scales, fp8 scales), outlier channel indices, the per-head
        mean key and fp8 scale (fp32), exact tokens (fp32)."""
        exact_tokens = self.length - self.quantized if self.kind.quantizes else self.length
        total = exact_tokens * self.kv_heads * self.head_dim * 4
        for transform in (self.center, self.head_scale):  # fp32, once per head
            total += 0 if transform is None else transform.nbytes
        norm_size = 2 if self.config.norm_dtype == "float16" else 4
        for group in self.groups:
            for batch, start, stop in group.pieces:
                # A batch's arrays all scale with its rows (per-channel baselines hold whole
                # groups), so a piece's share is proportional to its rows.
                rows = stop - start
                total += batch.nbytes * rows // len(batch)
                if batch.norms is not None:  # held as float32, stored at norm_dtype
                    total += rows * (norm_size - batch.norms.itemsize)
            if len(self.groups) > 1:
                total += group.channels.size * 2  # uint16 channel indices, once per head
        return total

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of the float32 working buffer as allocated (reconstruction and exact window)."""
        return self.buffer.nbytes

    @property
    def code_bits_per_coordinate(self) -> float:
        """Bits of codes (and QJL signs) per coordinate of a quantized token: the requested width."""
        if not self.kind.quantizes:
            return 32.0
        return sum(bits * size for bits, size in self.widths) / self.head_dim


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
        self._keys = _Store(kv_heads, head_dim, "key", seed, c, keep_reconstruction)
        self._values = _Store(kv_heads, head_dim, "value", seed + 1, c, keep_reconstruction)

    def __repr__(self) -> str:
        return f"QuantizedKVCache(layer={self.layer}, seq={len(self)}, config={self.config})"

    def __len__(self) -> int:
        return self._keys.length

    def copy(self) -> QuantizedKVCache:
        """An independent copy (its stored batches copied, its quantizers shared)."""
        quantizers = [group.quantizer for store in (self._keys, self._values) for group in store.groups]
        return copy.deepcopy(self, {id(quantizer): quantizer for quantizer in quantizers})

    def _check(self, name: str, tokens: np.ndarray, store: _Store) -> np.ndarray:
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

    def _push(self, keys: np.ndarray, values: np.ndarray) -> list[tuple[_Store, slice]]:
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
    _quantize_spans(pending)

"""One stream of a layer's KV cache, keys or values: :class:`StreamStore`, its channel groups and
their quantizers, and :func:`quantize_spans`, which quantizes the tokens leaving the exact window
of several stores in one kernel call per channel group.

A store follows its :class:`~tq.cache.config.CacheConfig` through the strategy registry
(:data:`tq.cache.strategies.STRATEGIES`); :class:`tq.cache.kvcache.QuantizedKVCache` holds one
per stream, and :mod:`tq.cache.packed_view` reads its packed batches.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, replace

import numpy as np

from tq.cache.config import CacheConfig, split_widths
from tq.cache.strategies import STRATEGIES
from tq.quant.batch import BatchQuantizedMSE
from tq.quant.fp8 import FP8_MAX, FP8Quantizer
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd
from tq.quant.uniform import BatchUniform, UniformQuantizer

_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels of every head quantized by one quantizer (TurboQuant or a baseline).

    ``channels`` int64 [kv_heads, size]: the head_dim indices of the group in each head.
    ``pieces``: one (batch, start, stop) per quantized span: rows start..stop-1 of a packed
    batch, which several layers' stores may share (one kernel call per decode step).
    """

    quantizer: TurboQuantMSE | TurboQuantProd | UniformQuantizer | FP8Quantizer
    channels: np.ndarray
    pieces: list[tuple[BatchQuantizedMSE | BatchUniform, int, int]] = field(default_factory=list)


@functools.cache
def shared_quantizer(
    strategy: str, dim: int, bits: int, seed: int, rotation: str, device: str
) -> TurboQuantMSE | TurboQuantProd:
    """One quantizer per configuration, shared by every layer's cache that uses it."""
    quantizer_type = TurboQuantProd if strategy == "prod" else TurboQuantMSE
    return quantizer_type(dim, bits, seed=seed, normalize=True, rotation=rotation, device=device)


def quantize_spans(pending: list[tuple[StreamStore, slice]]) -> None:
    """Quantize the spans that leave the exact window of several stores.

    Stores whose channel groups use the same quantizers (every layer of a model with one
    configuration) are quantized together: one kernel call per channel group and decode step,
    however many layers there are. Each store keeps its own slice of the packed batch.
    """
    buckets: dict[tuple, list[tuple[StreamStore, slice, np.ndarray]]] = {}
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


class StreamStore:
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
        self.groups: list[ChannelGroup] = []
        self.flush = 1
        self.center: np.ndarray | None = None  # float32 [kv_heads, head_dim]
        self.head_scale: np.ndarray | None = None  # float32 [kv_heads]
        self.centered = part == "key" and config.center_keys and kind.quantizes
        if kind.single_quantizer is not None:
            quantizer = kind.single_quantizer(part, head_dim, int(bits), seed, config)
            self.groups.append(ChannelGroup(quantizer, np.tile(np.arange(head_dim), (kv_heads, 1))))
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
        magnitude = np.mean(np.abs(tokens), axis=1, dtype=np.float64)  # [kv_heads, head_dim]
        order = np.argsort(-magnitude, axis=1, kind="stable")
        start = 0
        for index, (bits, size) in enumerate(self.widths):
            channels = np.sort(order[:, start : start + size], axis=1)
            quantizer = shared_quantizer(
                self.strategy, size, bits, self.seed + 1000 * index, self.config.rotation, self.config.device
            )
            self.groups.append(ChannelGroup(quantizer, channels))
            start += size

    def _store_norms(self, batch: BatchQuantizedMSE | BatchUniform) -> BatchQuantizedMSE | BatchUniform:
        """Round the norms to the stored precision (the fp16 range is checked on append)."""
        if self.config.norm_dtype == "float32" or batch.norms is None:
            return batch
        return replace(batch, norms=batch.norms.astype(np.float16).astype(np.float32))

    def _reconstruct(self, group: ChannelGroup, batch: BatchQuantizedMSE | BatchUniform) -> np.ndarray:
        """Dequantize one stored batch -> float32 [rows, group size], renormalized if asked
        (TurboQuant batches only: baseline batches have no norms)."""
        rows = group.quantizer.dequantize(batch)
        if self.config.renormalize and batch.norms is not None:
            lengths = np.linalg.norm(rows, axis=1)
            scale = np.where(lengths > 0, batch.norms / np.where(lengths > 0, lengths, 1.0), 0.0)
            rows = (rows * scale[:, None]).astype(np.float32)
        return rows

    def _gather(self, group: ChannelGroup, tokens: np.ndarray) -> np.ndarray:
        """The group's channels of tokens [kv_heads, t, head_dim] -> [kv_heads, t, size]."""
        if len(self.groups) == 1:
            return tokens
        index = np.broadcast_to(group.channels[:, None, :], (*tokens.shape[:2], group.channels.shape[1]))
        return np.take_along_axis(tokens, index, axis=2)

    def _scatter(self, group: ChannelGroup, part: np.ndarray, out: np.ndarray) -> None:
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

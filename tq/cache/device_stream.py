"""One stream (keys or values) of a layer's cache for a whole batch, as torch tensors on the
model's device: :class:`DeviceStream`, what :class:`tq.engines.transformers_cache.TurboQuantCache`
holds.

A stream holds, for ``batch`` sequences of ``kv_heads`` heads, per channel group, what its codec
(:mod:`tq.cache.device_codecs`) stores, position by position: TurboQuant's packed codes, norms
(``norm_dtype``) and for Prod the QJL signs and residual norms; a baseline's codes, zero points
and scales, or FP8 codes and scales. Beside them a buffer [batch, kv_heads, capacity, head_dim]
in the model's dtype holds the exact tokens (the residual window and the tokens of the last
call) and, when the reconstruction is kept, the quantized tokens' reconstruction before them;
an "exact" stream keeps every token there.

It follows the host store (:class:`tq.cache.stream.StreamStore`) step for step, so it holds the
host's bytes bit for bit: the mean key of a centred stream and an FP8 stream's per-head scale
come from the first tokens pushed, the channel groups of a fractional width (outliers first)
from the first tokens quantized; the quantizers are the host's shared ones; per-channel ("kivi")
keys leave the exact window in whole groups of tokens. The stream is for inference: its tensors
are made and changed in ``torch.inference_mode``. Tokens are quantized lazily: a call's tokens
stay exact in the buffer until :func:`settle_streams` (the next call, or a read of the stored
bytes) quantizes every token that has left the residual window, so what a call attends to is a
view of the buffer, never a copy.

Precision: tokens are quantized from float32 copies of the model's values (TurboQuant's rotation
in float64, rounded to float32, as on the host); reconstructions are computed in float32 and
stored in the model's dtype; exact tokens stay in the model's dtype (and are counted at its size).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tq.cache.config import CacheConfig, split_widths
from tq.cache.device_codecs import BaselineFields, TurboQuantFields, codec_for
from tq.cache.packed_view import PackedGroup, PackedStream
from tq.cache.strategies import STRATEGIES
from tq.cache.stream import shared_quantizer
from tq.quant.fp8 import FP8_MAX

__all__ = ["DeviceGroup", "DeviceStream", "settle_streams"]

_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class DeviceGroup:
    """One channel group: its codec, the channels of each head (int64 [batch, kv_heads, size],
    None for all channels), and its stored tensors, field name -> [batch, kv_heads, capacity /
    field.per, *field.shape] (the entries of the first ``quantized`` positions filled)."""

    codec: TurboQuantFields | BaselineFields
    channels: torch.Tensor | None
    stored: dict[str, torch.Tensor]


@functools.cache
def _all_channels(kv_heads: int, head_dim: int) -> np.ndarray:
    """int64 [kv_heads, head_dim]: every channel of every head (a single channel group)."""
    return np.tile(np.arange(head_dim), (kv_heads, 1))


def _renormalizing(norms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """norms / lengths, 0 where a reconstruction has no length: the factor that rescales each
    reconstruction to its stored norm."""
    return torch.where(lengths > 0, norms / torch.where(lengths > 0, lengths, 1.0), 0.0)


def _grown(tensor: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """``tensor`` [batch, heads, cap, ...] with room for ``capacity`` entries (the first ``used``
    kept). It grows by what is asked, and by at least 64 entries or 1/64 of its size: a decode
    step copies the store once in 64 steps, and the room left over stays under 2%."""
    held = tensor.shape[2]
    if held >= capacity:
        return tensor
    grown = tensor.new_empty(
        (*tensor.shape[:2], max(capacity, held + max(64, held // 64)), *tensor.shape[3:])
    )
    grown[:, :, :used] = tensor[:, :, :used]
    return grown


class DeviceStream:
    """One stream (``part`` "key" or "value") of a layer for a batch of sequences, on one device.

    Args:
        kv_heads, head_dim: the layer's geometry.
        part: "key" or "value".
        seed: seed of the stream's quantizers (keys: the config's seed, values: seed + 1).
        config: how the stream is stored (its ``device`` is ignored: the tensors' device rules).
        keep_reconstruction: keep the quantized tokens' reconstruction in the buffer (the
            ``reconstruct`` path) or only the exact tokens (the ``packed`` path).
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
        self.kv_heads, self.head_dim, self.part, self.seed = kv_heads, head_dim, part, seed
        self.config = config
        self.strategy = getattr(config, f"{part}_strategy")
        self.kind = kind = STRATEGIES[self.strategy]
        bits = getattr(config, f"{part}_bits")
        self.quantizes = kind.quantizes
        self.widths = split_widths(bits, head_dim) if kind.outlier_groups else []
        self.single = (
            None
            if kind.single_quantizer is None
            else kind.single_quantizer(part, head_dim, int(bits), seed, config)
        )
        self.flush = 1 if self.single is None else self.single.rows_per_group
        self.centered = part == "key" and config.center_keys and self.quantizes
        self.head_scaled = kind.family == "fp8" and config.fp8_scale == "head"
        self.keep_reconstruction = keep_reconstruction or not self.quantizes
        self.groups: list[DeviceGroup] = []
        self.center: torch.Tensor | None = None  # float32 [batch, kv_heads, head_dim]
        self.head_scale: torch.Tensor | None = None  # float32 [batch, kv_heads]
        self.buffer: torch.Tensor | None = None  # [batch, kv_heads, capacity, head_dim], model dtype
        self.length = 0  # tokens pushed
        self.quantized = 0  # tokens in the quantized store (0 for an exact stream)
        self.offset = 0  # the position of buffer[:, :, 0]

    @property
    def batch(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[0]

    # -- tokens in ------------------------------------------------------------------------------

    @torch.inference_mode()
    def push(self, tokens: torch.Tensor) -> None:
        """Add tokens [batch, kv_heads, t, head_dim] (the model's dtype), exact until settled."""
        t = tokens.shape[2]
        if self.buffer is None:
            self.buffer = tokens.new_empty((tokens.shape[0], self.kv_heads, t, self.head_dim))
            self._fix_transform(tokens.float())
        self.buffer = _grown(self.buffer, self.length - self.offset, self.length + t - self.offset)
        self.buffer[:, :, self.length - self.offset : self.length + t - self.offset] = tokens
        self.length += t

    def _fix_transform(self, tokens: torch.Tensor) -> None:
        """The per-head transform from the first tokens [batch, kv_heads, t, head_dim] (float32): the
        mean key of a centred stream, the scale of an FP8 stream scaled per head."""
        if self.centered:
            self.center = tokens.double().mean(dim=2).float()
        if self.head_scaled:
            shifted = tokens if self.center is None else tokens - self.center.unsqueeze(2)
            peak = shifted.abs().amax(dim=(2, 3)).double()
            self.head_scale = torch.where(peak > 0, peak / FP8_MAX, 1.0).float()

    def settle(self) -> None:
        """Quantize the tokens that have left the residual window (:func:`settle_streams`)."""
        settle_streams([self])

    def _leaving(self) -> tuple[torch.Tensor, int] | None:
        """The tokens that have left the residual window (whole groups of ``flush``) as the
        quantizer sees them, float32 [batch, kv_heads, n, head_dim], and the position after them;
        None when none have (or for an exact stream)."""
        leaving = self.length - self.config.residual_length - self.quantized
        leaving -= leaving % self.flush
        if not self.quantizes or leaving <= 0:
            return None
        stop = self.quantized + leaving
        span = self.buffer[:, :, self.quantized - self.offset : stop - self.offset].float()
        if self.center is not None:
            span = span - self.center.unsqueeze(2)
        if self.head_scale is not None:
            span = span / self.head_scale[:, :, None, None]
        if not self.groups:
            self._make_groups(span)
        return span, stop

    def _to_model_space(self, rows: torch.Tensor) -> torch.Tensor:
        """Undo the per-head transform on a reconstruction [batch, kv_heads, n, head_dim] (in place)."""
        if self.head_scale is not None:
            rows *= self.head_scale[:, :, None, None]
        if self.center is not None:
            rows += self.center.unsqueeze(2)
        return rows

    def _absorb(self, reconstruction: torch.Tensor | None, stop: int) -> None:
        """Positions quantized..stop-1 are now in the quantized store: their reconstruction
        (float32, in the quantizer's space) replaces them in the buffer, or (not kept) they
        leave it."""
        if reconstruction is not None:
            local = slice(self.quantized - self.offset, stop - self.offset)
            self.buffer[:, :, local] = self._to_model_space(reconstruction).to(self.buffer.dtype)
        else:  # keep the exact window only
            kept = self.buffer[:, :, stop - self.offset : self.length - self.offset].clone()
            if self.buffer.shape[2] > max(4 * kept.shape[2], 64):  # a prefill left a large buffer
                self.buffer = self.buffer.new_empty(
                    (*self.buffer.shape[:2], 2 * kept.shape[2] + 2, self.head_dim)
                )
            self.buffer[:, :, : kept.shape[2]] = kept
            self.offset = stop
        self.quantized = stop

    def _make_groups(self, tokens: torch.Tensor) -> None:
        """The channel groups, from the first quantized tokens [batch, kv_heads, t, head_dim]
        (float32, as the quantizer sees them): a baseline's one group of all channels, or
        TurboQuant's groups, the channels of largest mean |x| of each head first."""
        device, norm_dtype = tokens.device, self.config.norm_dtype
        if self.single is not None:
            self.groups.append(self._group(codec_for(self.single, device, norm_dtype), None))
            return
        order = None
        if len(self.widths) > 1:
            order = torch.argsort(-tokens.abs().double().mean(dim=2), dim=-1, stable=True)
        start = 0
        for index, (bits, size) in enumerate(self.widths):
            quantizer = shared_quantizer(
                self.strategy, size, bits, self.seed + 1000 * index, self.config.rotation, "cpu"
            )
            channels = None if order is None else torch.sort(order[..., start : start + size], dim=-1).values
            self.groups.append(self._group(codec_for(quantizer, device, norm_dtype), channels))
            start += size

    def _group(self, codec: TurboQuantFields | BaselineFields, channels: torch.Tensor | None) -> DeviceGroup:
        """An empty group of ``codec``'s fields."""
        stored = {
            field.name: torch.empty(
                (self.batch, self.kv_heads, 0, *field.shape), dtype=field.dtype, device=codec.device
            )
            for field in codec.fields
        }
        return DeviceGroup(codec, channels, stored)

    def _store(self, group: DeviceGroup, encoded: dict[str, torch.Tensor], stop: int) -> None:
        """Write the encode of positions quantized..stop-1 [batch, kv_heads, entries, ...] into the
        group's tensors."""
        for field in group.codec.fields:
            first, last = self.quantized // field.per, stop // field.per
            held = _grown(group.stored[field.name], first, last)
            held[:, :, first:last] = encoded[field.name]
            group.stored[field.name] = held

    def _gather(self, group: DeviceGroup, tokens: torch.Tensor) -> torch.Tensor:
        """The group's channels of tokens (or queries) [batch, kv_heads, t, head_dim] ->
        [batch, kv_heads, t, size]."""
        if group.channels is None:
            return tokens
        index = group.channels.unsqueeze(2).expand(*tokens.shape[:3], group.channels.shape[-1])
        return torch.gather(tokens, 3, index)

    def _scatter(self, group: DeviceGroup, part: torch.Tensor, out: torch.Tensor) -> None:
        """Write part [batch, kv_heads, t, size] into the group's channels of out [..., head_dim]."""
        if group.channels is None:
            out.copy_(part)
            return
        out.scatter_(3, group.channels.unsqueeze(2).expand(part.shape), part)

    # -- reading ------------------------------------------------------------------------------------

    def _decode_rows(self, group: DeviceGroup, flat: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stored entries of n rows (flattened) -> float32 rows [n, size], renormalized to the
        stored norm when asked (TurboQuant only)."""
        rows = group.codec.decode(flat)
        if self.config.renormalize and group.codec.norms:
            norms = flat["norms"].float()
            rows = rows * _renormalizing(norms, torch.linalg.vector_norm(rows, dim=-1)).unsqueeze(-1)
        return rows

    def _decode(self, group: DeviceGroup, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stored entries [batch, kv_heads, entries, ...] -> float32 rows [batch, kv_heads, n, size]."""
        lead = encoded["codes"].shape[:3]
        rows = self._decode_rows(
            group, {name: value.reshape(-1, *value.shape[3:]) for name, value in encoded.items()}
        )
        return rows.reshape(*lead, rows.shape[-1])

    def _entries(self, group: DeviceGroup, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The group's stored entries of positions start..stop-1 (on ``per`` bounds)."""
        return {
            field.name: group.stored[field.name][:, :, start // field.per : stop // field.per]
            for field in group.codec.fields
        }

    def rebuilt(self, start: int, stop: int) -> torch.Tensor:
        """Positions start..stop-1 of the quantized store rebuilt from what is stored, float32
        [batch, kv_heads, n, head_dim] (the per-head transform undone)."""
        first = start - start % self.flush  # per-channel groups decode whole
        out = torch.zeros(
            (self.batch, self.kv_heads, stop - first, self.head_dim),
            dtype=torch.float32,
            device=self.buffer.device,
        )
        for group in self.groups:
            self._scatter(group, self._decode(group, self._entries(group, first, stop)), out)
        return self._to_model_space(out)[:, :, start - first :]

    def exact(self, start: int = 0) -> torch.Tensor:
        """The exact tokens from position max(start, quantized) on [batch, kv_heads, e, head_dim]
        (a view of the buffer)."""
        first = max(start, self.quantized)
        return self.buffer[:, :, first - self.offset : self.length - self.offset]

    def view(self, start: int = 0) -> torch.Tensor:
        """Positions start.. [batch, kv_heads, length - start, head_dim] in the buffer's dtype: a
        view of the buffer when the reconstruction is kept, else rebuilt from what is stored,
        then the exact tokens."""
        if self.keep_reconstruction:
            return self.buffer[:, :, start - self.offset : self.length - self.offset]
        parts = [self.exact(start)]
        if start < self.quantized:
            parts.insert(0, self.rebuilt(start, self.quantized).to(self.buffer.dtype))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    # -- attention from the codes (the packed path) ---------------------------------------------

    def packed_problem(self, name: str) -> str | None:
        """Why attention cannot read this stream's codes (a baseline, Prod with renormalize), or
        None."""
        if not self.kind.packed_attention:
            return (
                f"attention from the packed cache does not support {name} strategy {self.strategy!r} "
                "(baseline strategies are out of scope); use 'mse', 'prod' or 'exact', or the reconstruct "
                "path (sdpa)"
            )
        if self.strategy == "prod" and self.config.renormalize:
            return (
                f"attention from the packed cache does not support renormalize=True with {name} "
                "strategy 'prod'"
            )
        return None

    def _scales(self, group: DeviceGroup, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Per-token scales of the rotated centroids: the norms, or for a renormalized MSE
        stream norm / |c[idx]| (the reconstruction's length)."""
        if not self.config.renormalize:
            return norms
        rotated = group.codec.codec.rotated_values(codes, torch.ones_like(norms))
        return _renormalizing(norms, torch.linalg.vector_norm(rotated, dim=-1))

    def _coded(self, group: DeviceGroup, start: int) -> tuple[torch.Tensor, ...]:
        """A TurboQuant group's codes, centroid scales, sign bits and QJL weights of positions
        start..quantized-1 (signs and weights None for MSE)."""
        entries = self._entries(group, start, self.quantized)
        codec = group.codec.codec
        norms = entries["norms"].float()
        scales = self._scales(group, entries["codes"], norms)
        if not codec.prod:
            return entries["codes"], scales, None, None
        return entries["codes"], scales, entries["signs"], codec.qjl_weights(entries["gammas"], norms)

    def scores(self, queries: torch.Tensor, start: int) -> torch.Tensor:
        """<q, k> for queries float32 [batch, kv_heads, g, head_dim] and the quantized keys
        start..quantized-1, from the codes -> float32 [batch, kv_heads, g, n]."""
        total = None
        for group in self.groups:
            codec = group.codec.codec
            codes, scales, signs, weights = self._coded(group, start)
            query = self._gather(group, queries)
            part = codec.rotate(query) @ codec.rotated_values(codes, scales).transpose(-1, -2)
            if signs is not None:
                part = part + (query @ codec.qjl.T) @ codec.sign_values(signs, weights).transpose(-1, -2)
            total = part if total is None else total + part
        if self.center is not None:  # q . (k_c + m) = q . k_c + q . m for every quantized key
            total = total + queries @ self.center.unsqueeze(-1)
        return total

    def weighted_sum(self, weights: torch.Tensor, start: int) -> torch.Tensor:
        """sum_t w_t v_t for weights float32 [batch, kv_heads, g, n] over the quantized values
        start..quantized-1, from the codes -> float32 [batch, kv_heads, g, head_dim]."""
        out = weights.new_zeros((*weights.shape[:3], self.head_dim))
        for group in self.groups:
            codec = group.codec.codec
            codes, scales, signs, sign_weights = self._coded(group, start)
            part = codec.unrotate(weights @ codec.rotated_values(codes, scales))
            if signs is not None:
                part = part + (weights @ codec.sign_values(signs, sign_weights)) @ codec.qjl
            if group.channels is None:
                out = out + part
            else:
                out.scatter_add_(3, group.channels.unsqueeze(2).expand(part.shape), part)
        return out

    def packed_views(self, start: int, new: torch.Tensor) -> list[PackedStream]:
        """Each sequence's tokens start.., then its ``new`` tokens [batch, kv_heads, n, head_dim], as
        the packed arrays tq's CPU attention kernels read (:mod:`tq.cache.attention`): NumPy views
        of the stream's CPU tensors (float32 tokens, no centred keys), no copy of the codes."""
        coded = max(self.quantized - start, 0)
        groups = []  # per channel group: (quantizer, channels, codes, scales, signs, gammas)
        for group in self.groups if coded else ():
            codes, scales, signs, _ = self._coded(group, start)
            channels = group.channels
            if channels is None:
                channels = torch.from_numpy(_all_channels(self.kv_heads, self.head_dim)).expand(
                    self.batch, -1, -1
                )
            gammas = None if signs is None else group.stored["gammas"][:, :, start : self.quantized]
            groups.append((group.codec.codec.quantizer, channels, codes, scales, signs, gammas))
        exact = torch.cat([self.exact(start), new], dim=2)
        return [
            PackedStream(
                [
                    PackedGroup(quantizer, *(None if part is None else part[row].numpy() for part in parts))
                    for quantizer, *parts in groups
                ],
                coded,
                exact[row].numpy(),
            )
            for row in range(self.batch)
        ]

    # -- checks, batch edits and sizes -------------------------------------------------------------

    def overflow(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """A 0-d bool tensor: a token [batch, kv_heads, t, head_dim] that this stream's float16
        fields cannot hold (a norm beyond float16 with float16 norms; a baseline's value, or
        rotated norm, beyond its quantizer's range); None when nothing can overflow."""
        if self.kind.norms and self.config.norm_dtype == "float16":
            return (torch.linalg.vector_norm(tokens.double(), dim=-1) > _FLOAT16_MAX).any()
        if self.single is None or getattr(self.single, "scale", "token") is None:
            return None
        if self.single.rotation is not None:
            return (torch.linalg.vector_norm(tokens.double(), dim=-1) > self.single.max_abs).any()
        return (tokens.abs().amax() > self.single.max_abs).any()

    def _slots(self) -> list[tuple[dict, str]]:
        """(holder, name) of every per-sequence tensor: the stream's own attributes, its groups'
        channels and stored fields."""
        held = [(vars(self), name) for name in ("buffer", "center", "head_scale")]
        for group in self.groups:
            held += [(vars(group), "channels"), *((group.stored, name) for name in group.stored)]
        return [(holder, name) for holder, name in held if holder[name] is not None]

    def _twin(self) -> DeviceStream:
        """A stream sharing this one's tensors in slots of its own (to be replaced)."""
        twin = copy.copy(self)
        twin.groups = [DeviceGroup(group.codec, group.channels, dict(group.stored)) for group in self.groups]
        return twin

    @torch.inference_mode()
    def select(self, index: torch.Tensor) -> None:
        """Sequences become sequences[index] (beam reorder, repeats, selection)."""
        for holder, name in self._slots():
            holder[name] = holder[name].index_select(0, index.to(holder[name].device))

    @torch.inference_mode()
    def copy(self) -> DeviceStream:
        """An independent copy (tensors cloned, codecs shared)."""
        twin = self._twin()
        for holder, name in twin._slots():
            holder[name] = holder[name].clone()
        return twin

    @staticmethod
    @torch.inference_mode()
    def concatenate(streams: list[DeviceStream]) -> DeviceStream:
        """One stream over the sequences of ``streams`` (one configuration, the same positions), copied."""
        if len({(s.length, s.quantized, s.offset) for s in streams}) != 1:
            raise ValueError("concatenate needs streams holding the same positions")
        joined = streams[0]._twin()
        parts = [stream._slots() for stream in streams]
        for index, (holder, name) in enumerate(joined._slots()):
            holder[name] = torch.cat([held[index][0][held[index][1]] for held in parts], dim=0)
        return joined

    @property
    def nbytes(self) -> int:
        """Bytes stored (as :attr:`tq.cache.stream.StreamStore.nbytes` counts them): every field of
        the quantized positions, outlier channel indices (uint16, once per head), the mean key and
        the FP8 per-head scale (fp32, once per head), and the exact tokens at the buffer's element
        size."""
        if self.buffer is None:
            return 0
        exact = (self.length - self.quantized) * self.batch * self.kv_heads * self.head_dim
        total = exact * self.buffer.element_size()
        for transform in (self.center, self.head_scale):
            total += 0 if transform is None else transform.numel() * 4
        for group in self.groups:
            for field in group.codec.fields:
                entries = group.stored[field.name][:, :, : self.quantized // field.per]
                total += entries.numel() * entries.element_size()
            if group.channels is not None:
                total += group.channels.numel() * 2
        return total

    @property
    def held_nbytes(self) -> int:
        """Bytes of every tensor the stream holds, as allocated (the room for later tokens too)."""
        return sum(holder[name].numel() * holder[name].element_size() for holder, name in self._slots())

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of the buffer as allocated (reconstruction and exact tokens)."""
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


@torch.inference_mode()
def settle_streams(streams: Sequence[DeviceStream]) -> None:
    """Quantize the tokens that have left the residual window of every stream: what its codec
    stores into its groups; their reconstruction into its buffer, or out of it.

    Streams whose channel groups share codecs (the layers of one configuration) are encoded
    together: one encode (and decode) per channel group, however many layers call.
    """
    buckets: dict[tuple, list[tuple[DeviceStream, torch.Tensor, int]]] = {}
    for stream in streams:
        leaving = stream._leaving()
        if leaving is not None:
            key = (
                tuple(id(group.codec) for group in stream.groups),
                stream.keep_reconstruction,
                stream.config.renormalize,
            )
            buckets.setdefault(key, []).append((stream, *leaving))
    for members in buckets.values():
        lead = members[0][0]
        outs = [torch.empty_like(span) if lead.keep_reconstruction else None for _, span, _ in members]
        for index, group in enumerate(lead.groups):
            parts = [stream._gather(stream.groups[index], span) for stream, span, _ in members]
            encoded = group.codec.encode(torch.cat([part.reshape(-1, part.shape[-1]) for part in parts]))
            rebuilt = lead._decode_rows(group, encoded) if lead.keep_reconstruction else None
            row = 0
            for (stream, _, stop), part, out in zip(members, parts, outs, strict=True):
                rows = part[..., 0].numel()
                piece = {
                    field.name: encoded[field.name][row // field.per : (row + rows) // field.per].reshape(
                        *part.shape[:2], -1, *field.shape
                    )
                    for field in group.codec.fields
                }
                stream._store(stream.groups[index], piece, stop)
                if out is not None:
                    stream._scatter(stream.groups[index], rebuilt[row : row + rows].reshape(part.shape), out)
                row += rows
        for (stream, _, stop), out in zip(members, outs, strict=True):
            stream._absorb(out, stop)

"""One stream (keys or values) of a layer's cache for a whole batch, as torch tensors on the
model's device: :class:`DeviceStream`, what :class:`tq.engines.transformers_cache.TurboQuantCache`
holds.

A stream holds, for ``batch`` sequences of ``kv_heads`` heads, per channel group of a TurboQuant
strategy ("mse", "prod"), the packed codes uint8 [batch, kv_heads, capacity, code_bytes], the
norms [batch, kv_heads, capacity] (float32, or float16 with ``norm_dtype="float16"``), and for
Prod the QJL sign bits and residual norms; an "exact" stream holds every token. Beside them a
buffer [batch, kv_heads, capacity, head_dim] in the model's dtype holds the exact tokens (the
residual window and the tokens of the last call), and, when the reconstruction is kept, the
quantized tokens' reconstruction before them.

It follows the host store (:class:`tq.cache.stream.StreamStore`) step for step, so its bytes are
the host's bit for bit (:mod:`tq.quant.torch_codec`): the mean key of a centred stream comes from
the first tokens pushed, the channel groups of a fractional width (outliers first) from the first
tokens quantized; the quantizers are the host's shared ones. The stream is for inference: its
tensors are made and changed in ``torch.inference_mode``. Tokens are quantized lazily: a
call's tokens stay exact in the buffer until :meth:`settle` (the next call, or a read of the
stored bytes), which quantizes every token that has left the residual window; what a call attends
to is then a view of the buffer, never a copy. Precision: tokens are quantized from float32
copies of the model's values; reconstructions are computed in float32 and stored in the model's
dtype.

The baselines ("uniform", "rotated-uniform", "kivi", "fp8") are refused: their quantizers run in
NumPy on the host (the ONNX Runtime engine's caches store them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from tq.cache.config import CacheConfig, split_widths
from tq.cache.packed_view import PackedGroup, PackedStream
from tq.cache.strategies import STRATEGIES
from tq.cache.stream import shared_quantizer
from tq.quant.torch_codec import TorchCodec, TorchCodes
from tq.quant.turboquant import TurboQuantMSE, TurboQuantProd

__all__ = ["DeviceStream", "device_store_problem", "settle_streams"]

_FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def device_store_problem(config: CacheConfig) -> str | None:
    """Why a device stream cannot hold ``config``'s keys or values (a baseline strategy), or None."""
    for part in ("key", "value"):
        strategy = getattr(config, f"{part}_strategy")
        if not STRATEGIES[strategy].device_store:
            stored = sorted(name for name, kind in STRATEGIES.items() if kind.device_store)
            return (
                f"the transformers engine's cache stores {', '.join(stored)} streams on the model's "
                f"device; {part} strategy {strategy!r} is a baseline whose quantizer runs on the host "
                "(use engine onnxruntime for it)"
            )
    return None


@functools.cache
def _codec(quantizer: TurboQuantMSE | TurboQuantProd, device: torch.device) -> TorchCodec:
    """One torch codec per shared quantizer and device."""
    return TorchCodec(quantizer, device)


@dataclass
class DeviceGroup:
    """One channel group of a TurboQuant stream: the channels of each head (int64 [batch, kv_heads,
    size], None for all channels), and the stored tokens' codes, norms, signs and gammas
    ([batch, kv_heads, capacity, ...], the first ``quantized`` positions filled)."""

    codec: TorchCodec
    channels: torch.Tensor | None
    codes: torch.Tensor
    norms: torch.Tensor
    signs: torch.Tensor | None = None
    gammas: torch.Tensor | None = None
    fields: tuple[str, ...] = field(default=("codes", "norms", "signs", "gammas"), repr=False)


@functools.cache
def _all_channels(kv_heads: int, head_dim: int) -> np.ndarray:
    """int64 [kv_heads, head_dim]: every channel of every head (a single channel group)."""
    return np.tile(np.arange(head_dim), (kv_heads, 1))


def _grown(tensor: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    """``tensor`` [batch, heads, cap, ...] with room for ``capacity`` positions (the first ``used``
    kept). It grows by what is asked, and by at least 64 positions or 1/64 of its size: a decode
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

    Raises:
        NotImplementedError: a baseline strategy (:func:`device_store_problem`).
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
        problem = device_store_problem(config)
        if problem is not None:
            raise NotImplementedError(problem)
        self.kv_heads, self.head_dim, self.part, self.seed, self.config = (
            kv_heads,
            head_dim,
            part,
            seed,
            config,
        )
        self.strategy = getattr(config, f"{part}_strategy")
        self.kind = STRATEGIES[self.strategy]
        self.quantizes = self.kind.quantizes
        self.widths = split_widths(getattr(config, f"{part}_bits"), head_dim) if self.quantizes else []
        self.centered = part == "key" and config.center_keys and self.quantizes
        self.keep_reconstruction = keep_reconstruction or not self.quantizes
        self.groups: list[DeviceGroup] = []
        self.center: torch.Tensor | None = None  # float32 [batch, kv_heads, head_dim]
        self.buffer: torch.Tensor | None = None  # [batch, kv_heads, capacity, head_dim], model dtype
        self.length = 0  # tokens pushed
        self.quantized = 0  # tokens in the quantized store
        self.offset = 0  # the position of buffer[:, :, 0]

    @property
    def batch(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[0]

    # -- tokens in ------------------------------------------------------------------------------

    @torch.inference_mode()
    def push(self, tokens: torch.Tensor) -> None:
        """Add tokens [batch, kv_heads, t, head_dim] (the model's dtype), exact until :meth:`settle`."""
        t = tokens.shape[2]
        if self.buffer is None:
            self.buffer = tokens.new_empty((tokens.shape[0], self.kv_heads, t, self.head_dim))
            if self.centered:
                self.center = tokens.float().double().mean(dim=2).float()
        self.buffer = _grown(self.buffer, self.length - self.offset, self.length + t - self.offset)
        self.buffer[:, :, self.length - self.offset : self.length + t - self.offset] = tokens
        self.length += t

    def settle(self) -> None:
        """Quantize the tokens that have left the residual window (:func:`settle_streams`)."""
        settle_streams([self])

    def _leaving(self) -> tuple[torch.Tensor, int] | None:
        """The tokens that have left the residual window, float32 and centred [batch, kv_heads,
        n, head_dim], and the position after them; None when none have (or an exact stream)."""
        stop = self.length - self.config.residual_length
        if not self.quantizes or stop <= self.quantized:
            return None
        span = self.buffer[:, :, self.quantized - self.offset : stop - self.offset].float()
        if self.center is not None:
            span = span - self.center.unsqueeze(2)
        if not self.groups:
            self._make_groups(span)
        return span, stop

    def _absorb(self, reconstruction: torch.Tensor | None, stop: int) -> None:
        """Positions quantized..stop-1 are now in the quantized store: their reconstruction
        (float32, centred) replaces them in the buffer, or (not kept) they leave it."""
        if reconstruction is not None:
            if self.center is not None:
                reconstruction += self.center.unsqueeze(2)
            local = slice(self.quantized - self.offset, stop - self.offset)
            self.buffer[:, :, local] = reconstruction.to(self.buffer.dtype)
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
        """Fix the channel groups from the first quantized tokens [batch, kv_heads, t, head_dim]
        (float32, centred): the channels of largest mean |x| per head are the outliers."""
        device = tokens.device
        order = None
        if len(self.widths) > 1:
            magnitude = tokens.abs().double().mean(dim=2)
            order = torch.argsort(-magnitude, dim=-1, stable=True)
        start = 0
        for index, (bits, size) in enumerate(self.widths):
            quantizer = shared_quantizer(
                self.strategy, size, bits, self.seed + 1000 * index, self.config.rotation, "cpu"
            )
            codec = _codec(quantizer, device)
            channels = None if order is None else torch.sort(order[..., start : start + size], dim=-1).values
            empty = (self.batch, self.kv_heads, 0)
            norm_dtype = torch.float16 if self.config.norm_dtype == "float16" else torch.float32
            prod = codec.prod
            self.groups.append(
                DeviceGroup(
                    codec,
                    channels,
                    torch.empty((*empty, codec.code_bytes), dtype=torch.uint8, device=device),
                    torch.empty(empty, dtype=norm_dtype, device=device),
                    torch.empty((*empty, codec.sign_bytes), dtype=torch.uint8, device=device)
                    if prod
                    else None,
                    torch.empty(empty, dtype=torch.float32, device=device) if prod else None,
                )
            )
            start += size

    def _store(self, group: DeviceGroup, stored: TorchCodes, stop: int) -> None:
        """Write an encode of positions quantized..stop-1 into the group's tensors."""
        for name in group.fields:
            held = getattr(group, name)
            if held is None:
                continue
            held = _grown(held, self.quantized, stop)
            held[:, :, self.quantized : stop] = getattr(stored, name).to(held.dtype)
            setattr(group, name, held)

    def _gather(self, group: DeviceGroup, tokens: torch.Tensor) -> torch.Tensor:
        """The group's channels of tokens [batch, kv_heads, t, head_dim] -> [batch, kv_heads, t, size]."""
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

    def _decode(
        self, group: DeviceGroup, codes: torch.Tensor, norms: torch.Tensor, stored: TorchCodes | None = None
    ) -> torch.Tensor:
        """Rebuild a group's rows [batch, kv_heads, n, size] (float32), renormalized if asked."""
        signs = gammas = None
        if group.codec.prod:
            signs, gammas = stored.signs, stored.gammas
        rows = group.codec.decode(TorchCodes(codes, norms, signs, gammas))
        if self.config.renormalize:
            lengths = torch.linalg.vector_norm(rows, dim=-1)
            safe = torch.where(lengths > 0, lengths, 1.0)
            rows = rows * torch.where(lengths > 0, norms / safe, 0.0).unsqueeze(-1)
        return rows

    def rebuilt(self, start: int, stop: int) -> torch.Tensor:
        """Positions start..stop-1 of the quantized store rebuilt from the codes, float32
        [batch, kv_heads, n, head_dim] (the mean key added back)."""
        out = torch.zeros(
            (self.batch, self.kv_heads, stop - start, self.head_dim),
            dtype=torch.float32,
            device=self.buffer.device,
        )
        for group in self.groups:
            stored = TorchCodes(
                group.codes[:, :, start:stop],
                group.norms[:, :, start:stop],
                None if group.signs is None else group.signs[:, :, start:stop],
                None if group.gammas is None else group.gammas[:, :, start:stop],
            )
            self._scatter(group, self._decode(group, stored.codes, stored.norms.float(), stored), out)
        if self.center is not None:
            out += self.center.unsqueeze(2)
        return out

    def exact(self, start: int = 0) -> torch.Tensor:
        """The exact tokens from position max(start, quantized) on [batch, kv_heads, e, head_dim]
        (a view of the buffer)."""
        first = max(start, self.quantized)
        return self.buffer[:, :, first - self.offset : self.length - self.offset]

    def view(self, start: int = 0) -> torch.Tensor:
        """Positions start.. [batch, kv_heads, length - start, head_dim] in the buffer's dtype: a
        view of the buffer when the reconstruction is kept, else rebuilt from the codes, then the
        exact tokens."""
        if self.keep_reconstruction:
            return self.buffer[:, :, start - self.offset : self.length - self.offset]
        parts = [self.exact(start)]
        if start < self.quantized:
            parts.insert(0, self.rebuilt(start, self.quantized).to(self.buffer.dtype))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    # -- attention from the codes (the packed path) ---------------------------------------------

    def packed_problem(self, name: str) -> str | None:
        """Why attention cannot read this stream's codes (Prod with renormalize), or None."""
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
        lengths = torch.linalg.vector_norm(group.codec.rotated_values(codes, torch.ones_like(norms)), dim=-1)
        return torch.where(lengths > 0, norms / torch.where(lengths > 0, lengths, 1.0), 0.0)

    def _group_query(self, group: DeviceGroup, queries: torch.Tensor) -> torch.Tensor:
        """The group's channels of queries [batch, kv_heads, g, head_dim] -> [batch, kv_heads, g, size]."""
        if group.channels is None:
            return queries
        index = group.channels.unsqueeze(2).expand(*queries.shape[:3], group.channels.shape[-1])
        return torch.gather(queries, 3, index)

    def scores(self, queries: torch.Tensor, start: int) -> torch.Tensor:
        """<q, k> for queries float32 [batch, kv_heads, g, head_dim] and the quantized tokens
        start..quantized-1, from the codes -> float32 [batch, kv_heads, g, n] (keys only)."""
        total = None
        for group in self.groups:
            codes = group.codes[:, :, start : self.quantized]
            norms = group.norms[:, :, start : self.quantized].float()
            query = self._group_query(group, queries)
            values = group.codec.rotated_values(codes, self._scales(group, codes, norms))
            part = group.codec.rotate(query) @ values.transpose(-1, -2)
            if group.codec.prod:
                weights = group.codec.qjl_weights(group.gammas[:, :, start : self.quantized], norms)
                signs = group.codec.sign_values(group.signs[:, :, start : self.quantized], weights)
                part = part + (query @ group.codec.qjl.T) @ signs.transpose(-1, -2)
            total = part if total is None else total + part
        if self.center is not None:  # q . (k_c + m) = q . k_c + q . m for every quantized key
            total = total + (queries @ self.center.unsqueeze(-1))
        return total

    def weighted_sum(self, weights: torch.Tensor, start: int) -> torch.Tensor:
        """sum_t w_t v_t for weights float32 [batch, kv_heads, g, n] over the quantized tokens
        start..quantized-1, from the codes -> float32 [batch, kv_heads, g, head_dim] (values only)."""
        out = weights.new_zeros((*weights.shape[:3], self.head_dim))
        for group in self.groups:
            codes = group.codes[:, :, start : self.quantized]
            norms = group.norms[:, :, start : self.quantized].float()
            values = group.codec.rotated_values(codes, self._scales(group, codes, norms))
            part = group.codec.unrotate(weights @ values)
            if group.codec.prod:
                signs = group.codec.sign_values(
                    group.signs[:, :, start : self.quantized],
                    group.codec.qjl_weights(group.gammas[:, :, start : self.quantized], norms),
                )
                part = part + (weights @ signs) @ group.codec.qjl
            if group.channels is None:
                out = out + part
            else:
                out.scatter_add_(3, group.channels.unsqueeze(2).expand(part.shape), part)
        return out

    def packed_view(self, row: int, start: int, new: torch.Tensor) -> PackedStream:
        """Sequence ``row``'s tokens start.. and then ``new`` [kv_heads, n, head_dim] as the packed
        arrays tq's CPU attention kernels read (:mod:`tq.cache.attention`): NumPy views of the
        stream's CPU tensors (float32 tokens), no copy of the codes."""
        groups = []
        coded = max(self.quantized - start, 0)
        for group in self.groups if coded else ():
            codes = group.codes[row, :, start : self.quantized]
            scales = self._scales(group, codes, group.norms[row, :, start : self.quantized].float())
            channels = (
                group.channels[row].numpy()
                if group.channels is not None
                else _all_channels(*codes.shape[:1], self.head_dim)
            )
            groups.append(
                PackedGroup(
                    group.codec.quantizer,
                    channels,
                    codes.numpy(),
                    scales.numpy(),
                    None if group.signs is None else group.signs[row, :, start : self.quantized].numpy(),
                    None if group.gammas is None else group.gammas[row, :, start : self.quantized].numpy(),
                )
            )
        exact = torch.cat([self.exact(start)[row], new], dim=1)
        return PackedStream(groups, coded, exact.numpy())

    # -- checks, batch edits and sizes -------------------------------------------------------------

    def norm_overflow(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """A 0-d bool tensor: a token [batch, kv_heads, t, head_dim] whose norm float16 cannot
        hold (float16 norms only), or None when the stream stores no float16 norms."""
        if not (self.quantizes and self.config.norm_dtype == "float16"):
            return None
        return (torch.linalg.vector_norm(tokens.double(), dim=-1) > _FLOAT16_MAX).any()

    def _tensors(self) -> list[tuple[object, str]]:
        """(owner, attribute) of every per-sequence tensor."""
        owners = [(self, "buffer"), (self, "center")]
        for group in self.groups:
            owners += [(group, "channels"), *((group, name) for name in group.fields)]
        return [(owner, name) for owner, name in owners if getattr(owner, name) is not None]

    @torch.inference_mode()
    def select(self, index: torch.Tensor) -> None:
        """Sequences become sequences[index] (beam reorder, repeats, selection)."""
        for owner, name in self._tensors():
            setattr(owner, name, getattr(owner, name).index_select(0, index.to(getattr(owner, name).device)))

    @torch.inference_mode()
    def copy(self) -> DeviceStream:
        """An independent copy (tensors cloned, codecs shared)."""
        twin = object.__new__(DeviceStream)
        twin.__dict__ = dict(self.__dict__)
        twin.groups = [DeviceGroup(**{**group.__dict__}) for group in self.groups]
        for owner, name in twin._tensors():
            setattr(owner, name, getattr(owner, name).clone())
        return twin

    @staticmethod
    @torch.inference_mode()
    def concatenate(streams: list[DeviceStream]) -> DeviceStream:
        """One stream over the sequences of ``streams`` (same configuration and positions), copied."""
        first = streams[0]
        if len({(s.length, s.quantized, s.offset) for s in streams}) != 1:
            raise ValueError("concatenate needs streams holding the same positions")
        joined = first.copy()
        for index, (owner, name) in enumerate(joined._tensors()):
            parts = [stream._tensors()[index] for stream in streams]
            setattr(owner, name, torch.cat([getattr(o, n) for o, n in parts], dim=0))
        return joined

    @property
    def nbytes(self) -> int:
        """Bytes stored (as :attr:`tq.cache.stream.StreamStore.nbytes` counts them): codes, norms at
        norm_dtype, QJL signs and gammas, outlier channel indices (uint16, once per head), the mean
        key (fp32, once per head), and the exact tokens at the buffer's element size."""
        if self.buffer is None:
            return 0
        exact = (self.length - self.quantized) * self.batch * self.kv_heads * self.head_dim
        total = exact * self.buffer.element_size()
        if self.center is not None:
            total += self.center.numel() * 4
        for group in self.groups:
            for name in group.fields:
                held = getattr(group, name)
                if held is not None:
                    total += held[:, :, : self.quantized].numel() * held.element_size()
            if group.channels is not None:
                total += group.channels.numel() * 2
        return total

    @property
    def held_nbytes(self) -> int:
        """Bytes of every tensor the stream holds, as allocated (the room for later tokens too)."""
        return sum(
            getattr(owner, name).numel() * getattr(owner, name).element_size()
            for owner, name in self._tensors()
        )

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of the buffer as allocated (reconstruction and exact tokens)."""
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


@torch.inference_mode()
def settle_streams(streams: Sequence[DeviceStream]) -> None:
    """Quantize the tokens that have left the residual window of every stream: codes into its
    store; their reconstruction into its buffer, or out of it.

    Streams whose channel groups share codecs (the layers of one configuration) are encoded
    together: one encode (and decode) per channel group, however many layers call.
    """
    buckets: dict[tuple, list[tuple[DeviceStream, torch.Tensor, int]]] = {}
    for stream in streams:
        leaving = stream._leaving()
        if leaving is not None:
            config = stream.config
            key = (
                tuple(id(group.codec) for group in stream.groups),
                stream.keep_reconstruction,
                config.norm_dtype,
                config.renormalize,
            )
            buckets.setdefault(key, []).append((stream, *leaving))
    for members in buckets.values():
        lead = members[0][0]
        outs = [torch.empty_like(span) if lead.keep_reconstruction else None for _, span, _ in members]
        for index, group in enumerate(lead.groups):
            parts = [stream._gather(stream.groups[index], span) for stream, span, _ in members]
            rows = torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])
            stored = group.codec.encode(rows)
            stored = replace(stored, norms=stored.norms.to(group.norms.dtype))
            if lead.keep_reconstruction:
                rebuilt = lead._decode(group, stored.codes, stored.norms.float(), stored)
            start = 0
            for (stream, _, stop), part, out in zip(members, parts, outs, strict=True):
                count, shape = part[..., 0].numel(), part.shape[:-1]
                piece = TorchCodes(
                    *(
                        None
                        if value is None
                        else value[start : start + count].reshape(*shape, *value.shape[1:])
                        for value in (stored.codes, stored.norms, stored.signs, stored.gammas)
                    )
                )
                stream._store(stream.groups[index], piece, stop)
                if out is not None:
                    stream._scatter(
                        stream.groups[index], rebuilt[start : start + count].reshape(part.shape), out
                    )
                start += count
        for (stream, _, stop), out in zip(members, outs, strict=True):
            stream._absorb(out, stop)

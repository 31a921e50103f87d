"""TurboQuant KV caches inside Hugging Face transformers (the ``models`` extra, transformers 4.57).

    from transformers import AutoModelForCausalLM
    from tq.engines.transformers_cache import TurboQuantCache
    from tq.cache.config import CacheConfig

    model = AutoModelForCausalLM.from_pretrained(checkpoint)            # attn_implementation="tq_packed"
    cache = TurboQuantCache(model.config, CacheConfig(key_bits=4, value_bits=4), exact_layers=[0])
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    cache.memory_report()

:class:`TurboQuantCache` is a transformers ``Cache`` whose layers (:class:`TurboQuantLayer`) hold
the whole batch's keys and values on the model's device, one
:class:`~tq.cache.device_stream.DeviceStream` each, built from one
:class:`~tq.cache.config.CacheConfig` (every knob of it: widths, strategies, residual window,
norms, rotation, seed) with per-layer exceptions (``exact_layers``, ``layer_configs``). The
stored bytes are tq's host caches' (:class:`tq.cache.kvcache.QuantizedKVCache`) bit for bit.

What a forward call computes is what tq's decode loop computes (:mod:`tq.engines.base`): the
tokens of the call attend to the earlier tokens' reconstruction and to their own exact keys and
values, and enter the cache (quantized, unless in the residual window) after the call. So a
decode step's own token is exact for its step and quantized for the later ones: the streams
quantize a call's tokens when the next call starts (its first layer does it for every layer at
once, :func:`tq.cache.device_stream.settle_streams`). The loop itself (prefill, greedy decoding,
teacher forcing) is :class:`tq.engines.transformers.TransformersRunner`.

Two ways to attend:

- ``reconstruct`` (any attention implementation, e.g. ``sdpa``): each layer keeps the
  reconstruction of its quantized tokens in the model's dtype and ``update`` returns a view of
  it, followed by the exact tokens.
- ``packed`` (the model loaded with ``attn_implementation="tq_packed"``, registered here): the
  cache keeps no copy of its quantized tokens. A decode step (one new token) attends straight
  from the codes (:meth:`TurboQuantLayer.attend`: tq's Numba CPU kernels on a float32 CPU model,
  else torch); prefill (several new tokens) attends with SDPA, over the earlier tokens rebuilt
  from the codes (none on a first prefill) and the new exact ones. The packed path reads
  TurboQuant and exact streams, and refuses attention masks that hide cached tokens (padded
  batches) and logit soft-capping.

Sliding-window layers (Gemma 3's local layers) attend, as transformers'
``DynamicSlidingWindowLayer``, to the last ``sliding_window - 1`` cached tokens and the new ones;
their quantized store keeps every token (tq's caches never evict; ``memory_report`` counts them).
``reorder_cache`` (beam search), ``batch_repeat_interleave`` and ``batch_select_indices`` index
the batch's tensors; ``crop`` (assisted and contrastive decoding) is refused once tokens would be
dropped, because a quantized cache cannot give back the exact states it replaced.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np

try:
    import torch
    import transformers
except ImportError as error:  # the models extra is optional
    raise ImportError(
        f"tq.engines.transformers_cache needs torch and transformers (pip install 'tq[models]'): {error}"
    ) from error
if not transformers.__version__.startswith("4.57."):
    raise ImportError(
        f"tq.engines.transformers_cache is built for transformers 4.57, found {transformers.__version__}"
    )
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tq.cache.attention import attend_packed
from tq.cache.config import EXACT, CacheConfig
from tq.cache.device_stream import DeviceStream, settle_streams
from tq.cache.packed_view import PackedCache

__all__ = ["ATTENTION", "TurboQuantCache", "TurboQuantLayer", "packed_attention"]

ATTENTION = "tq_packed"
_STEP = "_tq_layer"  # attribute of the key tensor that a packed decode step's update returns
PACKED_KERNELS = ("auto", "torch", "numba")
SIZES = ("stored_bytes", "buffer_bytes", "held_bytes", "fp32_bytes")  # the byte counts of a layer


class TurboQuantLayer(CacheLayerMixin):
    """One model layer's cache for the whole batch: a key and a value
    :class:`~tq.cache.device_stream.DeviceStream` on the model's device.

    Args:
        kv_heads, head_dim: the layer's key/value geometry.
        config: how its keys and values are stored.
        layer: the layer's index.
        sliding_window: the window of a sliding-window layer (None for full attention).
        keep_reconstruction: keep the quantized tokens' reconstruction (the ``reconstruct``
            path) or not (the ``packed`` path).
        validate: check every call's keys and values (finite; within what float16 norms or a
            baseline's float16 scales hold), which reads one flag back to the host per call.
        packed_kernels: what a packed decode step runs: "torch" (on any device), "numba" (tq's
            CPU kernels on views of the store: a float32 model on the CPU), or "auto" (numba
            where it applies, else torch).

    Raises:
        ValueError: an unknown ``packed_kernels``.
    """

    def __init__(
        self,
        kv_heads: int,
        head_dim: int,
        config: CacheConfig,
        layer: int,
        sliding_window: int | None,
        keep_reconstruction: bool,
        validate: bool = True,
        packed_kernels: str = "auto",
    ) -> None:
        if packed_kernels not in PACKED_KERNELS:
            raise ValueError(f"packed_kernels must be one of {PACKED_KERNELS}, got {packed_kernels!r}")
        self.packed_kernels = packed_kernels
        self.kv_heads, self.head_dim, self.config, self.layer = kv_heads, head_dim, config, layer
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.keep_reconstruction = keep_reconstruction
        self.validate = validate
        self.key_stream = DeviceStream(kv_heads, head_dim, "key", config.seed, config, keep_reconstruction)
        self.value_stream = DeviceStream(
            kv_heads, head_dim, "value", config.seed + 1, config, keep_reconstruction
        )
        self.joined: tuple[TurboQuantLayer, int] | None = None  # (batch layer, row) after concatenate
        self.siblings: list[TurboQuantLayer] = []  # the cache's layers (set by TurboQuantCache)
        self.is_initialized = False
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # a packed decode step's new tokens

    def __repr__(self) -> str:
        return f"TurboQuantLayer(layer={self.layer}, seq={self.get_seq_length()}, config={self.config})"

    @property
    def streams(self) -> tuple[DeviceStream, DeviceStream]:
        return self.key_stream, self.value_stream

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _start(self) -> int:
        """The first cached position that new tokens attend to (sliding layers: the last
        sliding_window - 1 cached tokens)."""
        length = self.get_seq_length()
        return max(length - self.sliding_window + 1, 0) if self.is_sliding else 0

    def _check(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Refuse new tokens of the wrong batch or shape, with NaN or inf, or with a norm that the
        stream's float16 norms cannot hold; one flag is read back for all the checks."""
        for name, tokens in (("keys", keys), ("values", values)):
            batch = self.key_stream.batch or tokens.shape[0]
            if tokens.ndim != 4 or tokens.shape[1] != self.kv_heads or tokens.shape[3] != self.head_dim:
                raise ValueError(
                    f"layer {self.layer} {name} must have shape [batch, {self.kv_heads}, new_tokens, "
                    f"{self.head_dim}], got {list(tokens.shape)}"
                )
            if tokens.shape[0] != batch:
                raise ValueError(f"the cache holds {batch} sequences, the call has {tokens.shape[0]}")
        if not self.validate:
            return
        bad = ~(torch.isfinite(keys).all() & torch.isfinite(values).all())
        for stream, tokens in zip(self.streams, (keys, values), strict=True):
            overflow = stream.overflow(tokens)
            bad = bad if overflow is None else bad | overflow
        if not bool(bad):
            return
        for name, tokens in (("keys", keys), ("values", values)):
            if not bool(torch.isfinite(tokens).all()):
                row, head, token, channel = (int(i) for i in torch.nonzero(~torch.isfinite(tokens))[0])
                value = "NaN" if torch.isnan(tokens[row, head, token, channel]) else "inf"
                raise ValueError(
                    f"layer {self.layer} {name} contain {value} (sequence {row}, head {head}, new token "
                    f"{token}, channel {channel})"
                )
        raise ValueError(
            f"layer {self.layer}: a key or value is beyond what this cache's float16 fields hold (a norm "
            f"beyond {torch.finfo(torch.float16).max:g} with norm_dtype='float16', or a value beyond a "
            "baseline's zero points and scales); use norm_dtype='float32' or an exact layer"
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take a call's new keys and values [batch, kv_heads, t, head_dim]; return what its
        tokens attend to (see the module docstring)."""
        if self.joined is not None:
            raise RuntimeError(
                f"layer {self.layer}: this cache was joined into a batch (TurboQuantCache.concatenate); "
                "call the model with the joined cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        if self._step is not None:
            raise RuntimeError(
                f"layer {self.layer}: the previous decode step's attention did not read the packed cache; "
                f"a TurboQuantCache without reconstruction needs the model loaded with "
                f'attn_implementation="{ATTENTION}"'
            )
        self._check(key_states, value_states)
        start = self._start()
        if self.siblings and self is self.siblings[0]:  # a call's first layer settles them all at once
            settle_streams([stream for layer in self.siblings for stream in layer.streams])
        else:
            self.settle()
        if not self.keep_reconstruction and key_states.shape[2] == 1 and self.key_stream.length:
            self._step = key_states, value_states  # packed_attention attends, then pushes them
            tagged = key_states.view_as(key_states)
            setattr(tagged, _STEP, self)
            return tagged, value_states
        self.key_stream.push(key_states)
        self.value_stream.push(value_states)
        return self.key_stream.view(start), self.value_stream.view(start)

    def settle(self) -> None:
        """Quantize the tokens of earlier calls that have left the residual window."""
        for stream in self.streams:
            stream.settle()

    def attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """A packed decode step: query [batch, heads, 1, head_dim] over the cached tokens' codes
        and exact tokens, and the step's own exact key and value (float32); then the step's
        tokens enter the cache. Returns [batch, heads, 1, head_dim] in the query's dtype."""
        new_keys, new_values = self._step
        self._step = None
        start = self._start()
        if self._numba_kernels(query):
            out = self._attend_numba(query, scale, start, new_keys, new_values)
        else:
            out = self._attend_torch(query, scale, start, new_keys, new_values)
        self.key_stream.push(new_keys)
        self.value_stream.push(new_values)
        return out.to(query.dtype)

    def _attend_numba(
        self, query: torch.Tensor, scale: float, start: int, new_keys: torch.Tensor, new_values: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`attend` through tq's Numba CPU kernels, a sequence at a time."""
        keys = self.key_stream.packed_views(start, new_keys)
        values = self.value_stream.packed_views(start, new_values)
        out = [
            attend_packed(
                np.ascontiguousarray(query[row].float().numpy()),
                PackedCache(self.kv_heads, self.head_dim, keys[row], values[row]),
                scale,
            )
            for row in range(query.shape[0])
        ]
        return torch.from_numpy(np.stack(out))

    def _attend_torch(
        self, query: torch.Tensor, scale: float, start: int, new_keys: torch.Tensor, new_values: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`attend` in torch on the query's device: scores and weighted values from the
        codes in the rotated domain, in float32."""
        keys, values = self.streams
        batch, heads = query.shape[:2]
        queries = query.float().reshape(batch, self.kv_heads, heads // self.kv_heads, self.head_dim)
        exact_keys = torch.cat([keys.exact(start), new_keys], dim=2).float()
        scores = queries @ exact_keys.transpose(-1, -2)
        if keys.quantized > start:
            scores = torch.cat([keys.scores(queries, start), scores], dim=-1)
        weights = torch.softmax(scores * scale, dim=-1)
        coded_values = max(values.quantized - start, 0)
        exact_values = torch.cat([values.exact(start), new_values], dim=2).float()
        out = weights[..., coded_values:] @ exact_values
        if coded_values:
            out = out + values.weighted_sum(weights[..., :coded_values], start)
        return out.reshape(batch, heads, 1, self.head_dim)

    def _numba_kernels(self, query: torch.Tensor) -> bool:
        """Whether a packed step runs tq's Numba CPU kernels on NumPy views of the store (a
        float32 model on the CPU, no centred keys; ``packed_kernels`` "auto" or "numba") or
        the torch implementation (anything else, and ``packed_kernels="torch"``)."""
        if self.packed_kernels == "torch":
            return False
        cpu = query.device.type == "cpu" and self.key_stream.buffer.dtype == torch.float32
        usable = cpu and query.dtype == torch.float32 and self.key_stream.center is None
        if self.packed_kernels == "numba" and not usable:
            raise NotImplementedError(
                f"layer {self.layer}: packed_kernels='numba' needs a float32 model on the CPU and no "
                "centred keys; use 'auto' or 'torch'"
            )
        return usable

    def packed_problem(self) -> str | None:
        """Why attention cannot read this layer's codes, or None."""
        return self.key_stream.packed_problem("key") or self.value_stream.packed_problem("value")

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask for the next call, as transformers' dynamic layers."""
        query_length, length = cache_position.shape[0], self.get_seq_length()
        start = self._start()
        return length - start + query_length, start

    def get_seq_length(self) -> int:
        if self.joined is not None:
            return self.joined[0].get_seq_length()
        return self.key_stream.length

    def get_max_cache_shape(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    @property
    def keys(self) -> torch.Tensor | None:
        """All cached keys [batch, kv_heads, seq, head_dim] in the model's dtype (rebuilt from the
        codes when no reconstruction is kept), or None before the first update."""
        return self._whole(self.key_stream)

    @property
    def values(self) -> torch.Tensor | None:
        """All cached values, as :attr:`keys`."""
        return self._whole(self.value_stream)

    def _whole(self, stream: DeviceStream) -> torch.Tensor | None:
        if self.joined is not None:
            layer, row = self.joined
            whole = layer._whole(layer.streams[stream.part == "value"])
            return whole[row : row + 1]
        if stream.buffer is None:
            return None
        stream.settle()
        return stream.view(0)

    def reset(self) -> None:
        """Empty the layer (its settings and its cache's other layers kept)."""
        siblings = self.siblings
        self.__init__(
            self.kv_heads, self.head_dim, self.config, self.layer, self.sliding_window,
            self.keep_reconstruction, self.validate, self.packed_kernels,
        )  # fmt: skip
        self.siblings = siblings

    def crop(self, max_length: int) -> None:
        """Refused unless nothing would be dropped (a negative ``max_length`` counts from the end)."""
        length = self.get_seq_length()
        target = length + max_length if max_length < 0 else max_length
        if target < length:
            raise NotImplementedError(
                f"TurboQuantCache cannot crop layer {self.layer} from {length} to {target} tokens: its "
                "quantized tokens cannot be restored exactly (assisted and contrastive decoding need crop)"
            )

    def _select(self, indices: torch.Tensor) -> None:
        """Sequences become sequences[i] for i in indices."""
        if self.key_stream.buffer is None:
            return
        for stream in self.streams:
            stream.select(torch.as_tensor(indices, dtype=torch.long))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(torch.arange(self.key_stream.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def sizes(self) -> dict[str, int]:
        """This layer's tokens, sequences and bytes: ``stored_bytes``, ``buffer_bytes`` (see
        :meth:`TurboQuantCache.memory_report`) and ``fp32_bytes``; a row of a joined batch
        reports its share."""
        if self.joined is not None:
            layer, _ = self.joined
            whole = layer.sizes()
            share = max(whole["sequences"], 1)
            return {
                "layer": self.layer,
                "tokens": whole["tokens"],
                "sequences": 1,
                **{key: whole[key] // share for key in SIZES},
            }
        self.settle()
        batch, length = self.key_stream.batch, self.get_seq_length()
        return {
            "layer": self.layer,
            "tokens": length,
            "sequences": batch,
            "stored_bytes": sum(stream.nbytes for stream in self.streams),
            "buffer_bytes": sum(stream.buffer_nbytes for stream in self.streams),
            "held_bytes": sum(stream.held_nbytes for stream in self.streams),
            "fp32_bytes": 2 * batch * length * self.kv_heads * self.head_dim * 4,
        }


def _link(layers: list[TurboQuantLayer]) -> None:
    """Let every layer of a cache see the others (the first one settles them all)."""
    for layer in layers:
        layer.siblings = layers


def _geometry(model_config: PretrainedConfig) -> tuple[int, int, int, list[int | None]]:
    """(layers, kv_heads, head_dim, sliding window per layer) of a decoder config."""
    text = model_config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    window = getattr(text, "sliding_window", None)
    types = (
        getattr(text, "layer_types", None)
        or ["sliding_attention" if window is not None else "full_attention"] * text.num_hidden_layers
    )
    if any(kind not in ("full_attention", "sliding_attention") for kind in types):
        raise NotImplementedError(
            f"TurboQuantCache handles full and sliding attention layers, got {sorted(set(types))}"
        )
    windows = [window if kind == "sliding_attention" else None for kind in types]
    return text.num_hidden_layers, kv_heads, head_dim, windows


class TurboQuantCache(Cache):
    """A transformers cache that stores keys and values quantized, on the model's device.

    Args:
        model_config: the model's config (``model.config``).
        cache_config: the configuration of every layer (default ``CacheConfig()``: 4-bit MSE) ...
        exact_layers: ... except these layer indices, kept exact (the model's dtype) ...
        layer_configs: ... and these (index -> CacheConfig), e.g. ``tq.cache.config.exact_layers``.
        keep_reconstruction: keep the reconstruction (the ``reconstruct`` path); default: not
            when the model's attention implementation is ``"tq_packed"``.
        validate: check every call's keys and values (one flag read back per layer and call).
        packed_kernels: "auto", "torch" or "numba": what a packed decode step runs
            (:class:`TurboQuantLayer`).

    Raises:
        ValueError: a layer index outside the model's layers, an unknown ``packed_kernels``.
    """

    def __init__(
        self,
        model_config: PretrainedConfig,
        cache_config: CacheConfig | None = None,
        exact_layers: Iterable[int] = (),
        layer_configs: dict[int, CacheConfig] | None = None,
        keep_reconstruction: bool | None = None,
        validate: bool = True,
        packed_kernels: str = "auto",
    ) -> None:
        num_layers, kv_heads, head_dim, windows = _geometry(model_config)
        cache_config = cache_config or CacheConfig()
        overrides = {int(layer): EXACT for layer in exact_layers} | dict(layer_configs or {})
        outside = sorted(set(overrides) - set(range(num_layers)))
        if outside:
            raise ValueError(f"layers {outside} are outside the model's layers 0..{num_layers - 1}")
        if keep_reconstruction is None:
            keep_reconstruction = getattr(model_config, "_attn_implementation", None) != ATTENTION
        self.keep_reconstruction = keep_reconstruction
        layers = [
            TurboQuantLayer(
                kv_heads,
                head_dim,
                overrides.get(index, cache_config),
                index,
                windows[index],
                keep_reconstruction,
                validate,
                packed_kernels,
            )
            for index in range(num_layers)
        ]
        super().__init__(layers=layers)
        _link(self.layers)

    @classmethod
    def concatenate(cls, caches: Iterable[TurboQuantCache]) -> TurboQuantCache:
        """One cache over the sequences of ``caches`` (filled, of one model and length), in order.

        The sequences' tensors are copied into the batch; each cache of ``caches`` then reads as
        its row of the result (its length and sizes follow the batch as it grows) and refuses
        calls of its own.
        """
        caches = list(caches)
        first = caches[0]
        if not all(
            layer.is_initialized and layer.joined is None for cache in caches for layer in cache.layers
        ):
            raise ValueError(
                "concatenate needs caches that hold tokens (after their prefill), not joined ones"
            )
        if (
            len({cache.get_seq_length() for cache in caches}) != 1
            or len({len(cache.layers) for cache in caches}) != 1
        ):
            raise ValueError("concatenate needs caches of one model holding sequences of one length")
        joined = copy.copy(first)
        joined.layers = []
        for index, layer in enumerate(first.layers):
            batch = copy.copy(layer)
            for cache in caches:
                cache.layers[index].settle()
            batch.key_stream = DeviceStream.concatenate([cache.layers[index].key_stream for cache in caches])
            batch.value_stream = DeviceStream.concatenate(
                [cache.layers[index].value_stream for cache in caches]
            )
            joined.layers.append(batch)
        for row, cache in enumerate(caches):
            for layer, batch in zip(cache.layers, joined.layers, strict=True):
                layer.joined = (batch, row)
        _link(joined.layers)
        return joined

    def copy(self) -> TurboQuantCache:
        """An independent copy (every tensor cloned)."""
        twin = copy.copy(self)
        twin.layers = []
        for layer in self.layers:
            if layer.joined is not None:
                raise ValueError("copy the joined cache, not one of its rows")
            layer_copy = copy.copy(layer)
            layer_copy.key_stream, layer_copy.value_stream = (stream.copy() for stream in layer.streams)
            twin.layers.append(layer_copy)
        _link(twin.layers)
        return twin

    @property
    def nbytes(self) -> int:
        """Bytes the cache format needs for every stored token (codes, norms, exact tokens)."""
        return sum(layer.sizes()["stored_bytes"] for layer in self.layers)

    @property
    def float_nbytes(self) -> int:
        """Bytes of the same tokens as float32 keys and values."""
        return sum(layer.sizes()["fp32_bytes"] for layer in self.layers)

    def memory_report(self) -> dict[str, Any]:
        """Bytes per layer and in all: ``stored`` (codes, norms, exact tokens: what the cache
        format needs), ``buffer`` (the working buffers as allocated: the reconstruction when
        kept, the exact tokens), ``held`` (every tensor the device holds for the cache, as
        allocated: buffers, and the stores with their room for later tokens), ``fp32`` (the
        same tokens as float32 keys and values), and the ratio fp32 / stored."""
        layers = [layer.sizes() for layer in self.layers]
        totals = {key: sum(entry[key] for entry in layers) for key in SIZES}
        stored = totals["stored_bytes"]
        return {
            **totals,
            "compression_ratio": totals["fp32_bytes"] / stored if stored else None,
            "keep_reconstruction": self.keep_reconstruction,
            "layers": layers,
        }


def _check_mask(attention_mask: torch.Tensor | None) -> None:
    """Refuse a mask that hides a cached token from the decode step's query (padding)."""
    if attention_mask is None:
        return
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if not bool(visible.all()):
        raise NotImplementedError(
            f'attn_implementation="{ATTENTION}" cannot mask cached tokens (padded batches); use '
            "equal-length sequences, or the reconstruct path (sdpa)"
        )


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``tq_packed`` attention: a packed decode step of a :class:`TurboQuantCache` reads the
    codes (:meth:`TurboQuantLayer.attend`); anything else is SDPA. Returns
    ([batch, q_len, heads, head_dim], None) as transformers' attention functions do."""
    layer = getattr(key, _STEP, None)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f'attn_implementation="{ATTENTION}" does not support logit soft-capping')
    if dropout:
        raise NotImplementedError(f'attn_implementation="{ATTENTION}" is for inference: dropout must be 0')
    _check_mask(attention_mask)
    problem = layer.packed_problem()
    if problem is not None:
        raise NotImplementedError(problem)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, float(scale)).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)

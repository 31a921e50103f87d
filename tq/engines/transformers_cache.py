"""TurboQuant KV caches inside Hugging Face transformers (the ``models`` extra, transformers 4.57).

    from transformers import AutoModelForCausalLM
    from tq.engines.transformers_cache import TurboQuantCache
    from tq.cache.config import CacheConfig

    model = AutoModelForCausalLM.from_pretrained(checkpoint)            # attn_implementation="tq_packed"
    cache = TurboQuantCache(model.config, CacheConfig(key_bits=4, value_bits=4), exact_layers=[0])
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    cache.memory_report()

:class:`TurboQuantCache` is a transformers ``Cache`` whose layers (:class:`TurboQuantLayer`) hold
one :class:`tq.cache.kvcache.QuantizedKVCache` per sequence of the batch, built from one
:class:`~tq.cache.config.CacheConfig` (every knob of it: widths, strategies, residual window, norms,
rotation, seed, device) with per-layer exceptions (``exact_layers``, ``layer_configs``).

What a forward call computes is what tq's decode loop computes (:mod:`tq.engines.base`): the
tokens of the call attend to the earlier tokens' reconstruction and to their own exact keys and
values, and enter the cache (quantized, unless in the residual window) after the call. So a
decode step's own token is exact for its step and quantized for the later ones. The loop itself
(prefill, greedy decoding, teacher forcing) is :class:`tq.engines.transformers.TransformersRunner`.

Two ways to attend:

- ``reconstruct`` (any attention implementation, e.g. ``sdpa``): each layer keeps a float32
  reconstruction of its quantized tokens and ``update`` returns it, followed by the new tokens.
- ``packed`` (the model loaded with ``attn_implementation="tq_packed"``, registered here): the
  cache keeps no float copy of its quantized tokens. A decode step (one new token) attends with
  :func:`tq.cache.attention.decode_attention` straight from the packed codes; prefill (several new
  tokens) attends in float with SDPA, over the earlier tokens rebuilt from the codes (none on a
  first prefill) and the new exact ones. The packed path refuses attention masks that hide
  cached tokens (padded batches) and logit soft-capping.

Sliding-window layers (Gemma 3's local layers) attend, as transformers'
``DynamicSlidingWindowLayer``, to the last ``sliding_window - 1`` cached tokens and the new ones;
their quantized store keeps every token (tq's caches never evict; ``memory_report`` counts them).
``reorder_cache`` (beam search), ``batch_repeat_interleave`` and ``batch_select_indices`` copy
per-sequence caches; ``crop`` (assisted and contrastive decoding) is refused once tokens would be
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

from tq.cache.attention import decode_attention
from tq.cache.config import EXACT, CacheConfig
from tq.cache.kvcache import QuantizedKVCache, append_each

__all__ = ["ATTENTION", "TurboQuantCache", "TurboQuantLayer", "packed_attention"]

ATTENTION = "tq_packed"
_STEP = "_tq_layer"  # attribute of the key tensor that a packed decode step's update returns


def _numpy(states: torch.Tensor) -> np.ndarray:
    """[batch, kv_heads, t, head_dim] torch -> float32 NumPy (a copy on the host)."""
    return states.detach().to(device="cpu", dtype=torch.float32).numpy()


class TurboQuantLayer(CacheLayerMixin):
    """One model layer's cache: a :class:`~tq.cache.kvcache.QuantizedKVCache` per sequence.

    Args:
        kv_heads, head_dim: the layer's key/value geometry.
        config: how its keys and values are stored.
        layer: the layer's index.
        sliding_window: the window of a sliding-window layer (None for full attention).
        keep_reconstruction: keep float32 reconstructions (the ``reconstruct`` path) or not
            (the ``packed`` path).
    """

    def __init__(
        self,
        kv_heads: int,
        head_dim: int,
        config: CacheConfig,
        layer: int,
        sliding_window: int | None,
        keep_reconstruction: bool,
    ) -> None:
        self.kv_heads, self.head_dim, self.config, self.layer = kv_heads, head_dim, config, layer
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.keep_reconstruction = keep_reconstruction
        self.rows: list[QuantizedKVCache] = []
        self.is_initialized = False
        self._step: tuple[np.ndarray, np.ndarray] | None = None  # a packed decode step's new tokens

    def __repr__(self) -> str:
        return f"TurboQuantLayer(layer={self.layer}, seq={self.get_seq_length()}, config={self.config})"

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.rows = [
            QuantizedKVCache(
                self.kv_heads,
                self.head_dim,
                self.config,
                self.layer,
                keep_reconstruction=self.keep_reconstruction,
            )
            for _ in range(key_states.shape[0])
        ]
        self.is_initialized = True

    def _start(self) -> int:
        """The first cached position that new tokens attend to (sliding layers: the last
        sliding_window - 1 cached tokens)."""
        length = self.get_seq_length()
        return max(length - self.sliding_window + 1, 0) if self.is_sliding else 0

    def _stacked(self, part: str, start: int, new: np.ndarray | None = None) -> np.ndarray:
        """Cached keys or values from ``start`` of every sequence, then the call's ``new`` ones
        [batch, kv_heads, n, head_dim], in one array [batch, kv_heads, t, head_dim]."""
        cached = [getattr(row, part)()[:, start:] for row in self.rows]
        extra = 0 if new is None else new.shape[2]
        out = np.empty((len(cached), self.kv_heads, cached[0].shape[1] + extra, self.head_dim), np.float32)
        for row, tokens in enumerate(cached):
            out[row, :, : tokens.shape[1]] = tokens
        if new is not None:
            out[:, :, cached[0].shape[1] :] = new
        return out

    def _torch(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device=self.device, dtype=self.dtype)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take a call's new keys and values [batch, kv_heads, t, head_dim]; return what its
        tokens attend to (see the module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        if self._step is not None:
            raise RuntimeError(
                f"layer {self.layer}: the previous decode step's attention did not read the packed cache; "
                f"a TurboQuantCache without reconstruction needs the model loaded with "
                f'attn_implementation="{ATTENTION}"'
            )
        if key_states.shape[0] != len(self.rows):
            raise ValueError(
                f"the cache holds {len(self.rows)} sequences, the call has {key_states.shape[0]}"
            )
        keys, values = _numpy(key_states), _numpy(value_states)
        if not self.keep_reconstruction and keys.shape[2] == 1:
            self._step = keys, values  # packed_attention attends, then appends them
            tagged = key_states.view_as(key_states)
            setattr(tagged, _STEP, self)
            return tagged, value_states
        full_keys, full_values = key_states, value_states
        if self.get_seq_length():
            start = self._start()
            full_keys = self._torch(self._stacked("keys", start, keys))
            full_values = self._torch(self._stacked("values", start, values))
        append_each(self.rows, list(keys), list(values))
        return full_keys, full_values

    def attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """A packed decode step: query [batch, heads, 1, head_dim] over the cached tokens' codes
        and the step's own exact key and value; then the step's tokens enter the cache.
        Returns [batch, heads, 1, head_dim]."""
        keys, values = self._step
        self._step = None
        queries, start = _numpy(query), self._start()
        out = np.stack(
            [
                decode_attention(q, row, scale, start=start, new_keys=k, new_values=v)
                for q, row, k, v in zip(queries, self.rows, keys, values, strict=True)
            ]
        )
        append_each(self.rows, list(keys), list(values))
        return torch.from_numpy(out).to(device=query.device, dtype=query.dtype)

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask for the next call, as transformers' dynamic layers."""
        query_length, length = cache_position.shape[0], self.get_seq_length()
        start = self._start()
        return length - start + query_length, start

    def get_seq_length(self) -> int:
        return len(self.rows[0]) if self.rows else 0

    def get_max_cache_shape(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    @property
    def keys(self) -> torch.Tensor | None:
        """All cached keys [batch, kv_heads, seq, head_dim] (rebuilt from the codes when no
        reconstruction is kept), or None before the first update."""
        return self._torch(self._stacked("keys", 0)) if self.rows else None

    @property
    def values(self) -> torch.Tensor | None:
        """All cached values, as :attr:`keys`."""
        return self._torch(self._stacked("values", 0)) if self.rows else None

    def reset(self) -> None:
        self.rows, self.is_initialized, self._step = [], False, None

    def crop(self, max_length: int) -> None:
        """Refused unless nothing would be dropped (a negative ``max_length`` counts from the end)."""
        length = self.get_seq_length()
        target = length + max_length if max_length < 0 else max_length
        if target < length:
            raise NotImplementedError(
                f"TurboQuantCache cannot crop layer {self.layer} from {length} to {target} tokens: its "
                "quantized tokens cannot be restored exactly (assisted and contrastive decoding need crop)"
            )

    def _select(self, indices: Iterable[int]) -> None:
        """Rows become rows[i] for i in indices; a row taken twice is copied."""
        taken: set[int] = set()
        rows = []
        for index in indices:
            rows.append(self.rows[index].copy() if index in taken else self.rows[index])
            taken.add(index)
        self.rows = rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([row for row in range(len(self.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices).tolist())


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
    """A transformers cache that stores keys and values with tq's quantized caches.

    Args:
        model_config: the model's config (``model.config``).
        cache_config: the configuration of every layer (default ``CacheConfig()``: 4-bit MSE) ...
        exact_layers: ... except these layer indices, kept exact (fp32) ...
        layer_configs: ... and these (index -> CacheConfig), e.g. ``tq.cache.config.exact_layers``.
        keep_reconstruction: keep float32 reconstructions (the ``reconstruct`` path); default:
            not when the model's attention implementation is ``"tq_packed"``.

    Raises:
        ValueError: a layer index outside the model's layers.
    """

    def __init__(
        self,
        model_config: PretrainedConfig,
        cache_config: CacheConfig | None = None,
        exact_layers: Iterable[int] = (),
        layer_configs: dict[int, CacheConfig] | None = None,
        keep_reconstruction: bool | None = None,
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
            )
            for index in range(num_layers)
        ]
        super().__init__(layers=layers)

    @classmethod
    def concatenate(cls, caches: Iterable[TurboQuantCache]) -> TurboQuantCache:
        """One cache over the sequences of ``caches`` (filled, of one model and length), in order.

        The sequences' stores are shared, not copied: a call through the result appends to the
        caches it was made from (their ``nbytes`` count it), as one batch.
        """
        caches = list(caches)
        first = caches[0]
        if not all(layer.is_initialized for cache in caches for layer in cache.layers):
            raise ValueError("concatenate needs caches that hold tokens (after their prefill)")
        if (
            len({cache.get_seq_length() for cache in caches}) != 1
            or len({len(cache.layers) for cache in caches}) != 1
        ):
            raise ValueError("concatenate needs caches of one model holding sequences of one length")
        return first._with_rows(
            [
                [row for cache in caches for row in cache.layers[index].rows]
                for index in range(len(first.layers))
            ]
        )

    def copy(self) -> TurboQuantCache:
        """An independent copy (every sequence's store copied)."""
        return self._with_rows([[row.copy() for row in layer.rows] for layer in self.layers])

    def _with_rows(self, rows: list[list[QuantizedKVCache]]) -> TurboQuantCache:
        """This cache with layer i holding the per-sequence stores ``rows[i]``."""
        cache = copy.copy(self)
        cache.layers = [copy.copy(layer) for layer in self.layers]
        for layer, layer_rows in zip(cache.layers, rows, strict=True):
            layer.rows = layer_rows
        return cache

    @property
    def nbytes(self) -> int:
        """Bytes the cache format needs for every stored token (codes, norms, exact tokens)."""
        return sum(row.nbytes for layer in self.layers for row in layer.rows)

    @property
    def float_nbytes(self) -> int:
        """Bytes of the same tokens as float32 keys and values."""
        return sum(row.float_nbytes for layer in self.layers for row in layer.rows)

    def memory_report(self) -> dict[str, Any]:
        """Bytes per layer and in all: ``stored`` (codes, norms, exact tokens: what the cache
        format needs), ``buffers`` (float32 working buffers: the reconstruction when kept, the
        exact window), ``fp32`` (the same tokens as float32 keys and values), and the ratio
        fp32 / stored."""
        layers = []
        for layer in self.layers:
            rows = layer.rows
            layers.append(
                {
                    "layer": layer.layer,
                    "tokens": layer.get_seq_length(),
                    "sequences": len(rows),
                    "stored_bytes": sum(row.nbytes for row in rows),
                    "buffer_bytes": sum(row.buffer_nbytes for row in rows),
                    "fp32_bytes": sum(row.float_nbytes for row in rows),
                }
            )
        totals = {
            key: sum(entry[key] for entry in layers) for key in ("stored_bytes", "buffer_bytes", "fp32_bytes")
        }
        stored = totals["stored_bytes"]
        return {
            **totals,
            "held_bytes": stored + totals["buffer_bytes"],
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
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, float(scale)).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)

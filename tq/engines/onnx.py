"""The ONNX Runtime engine: :class:`OnnxRunner` runs an exported bundle on the CPU in float32.

Prefill runs the prompt in calls of :data:`PREFILL_CHUNK` tokens; then one token per call,
feeding the graph's ``present.N.key/value`` back as ``past_key_values.N.key/value``. Inputs are
fed by name (``attention_mask``, ``position_ids = past + arange(s)``, ``cache_position`` and
``use_cache_branch`` where the graph has them). The decode loop itself is
:class:`tq.engines.base.DecodeRunner`'s.

In quantized mode the cache is a :class:`~tq.cache.kvcache.MultiHeadKVCache`: each call's new keys and
values (``present`` beyond the past length) are appended, i.e. quantized once when they enter,
and the past given to ONNX Runtime is the cache's float reconstruction. What this does and does
not do: the stored cache is quantized, but ONNX Runtime still computes float attention; the
tokens of the current call attend to their own exact keys and values (the graph computes them),
which are quantized for later calls.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from tq.cache.config import CacheConfig
from tq.cache.kvcache import MultiHeadKVCache, append_batch
from tq.engines.base import DecodeRunner
from tq.kernels.cpu import single_threaded_blas
from tq.models.bundle import ModelBundle

Past = list[tuple[np.ndarray, np.ndarray]]
# Prompt tokens per prefill call. Measured on SmolLM2-135M, 2 threads: a 4096-token prompt takes
# 27.8 s in one call and 14.6 s in calls of 512 (the same logits to the bit); 1024 tokens 2.5 s
# vs 2.2 s.
PREFILL_CHUNK = 512
# One quantized cache per sequence of a batch; a single cache stands for a batch of one.
Caches = MultiHeadKVCache | Sequence[MultiHeadKVCache]


def _cache_list(caches: Caches) -> list[MultiHeadKVCache]:
    return [caches] if isinstance(caches, MultiHeadKVCache) else list(caches)


class OnnxRunner(DecodeRunner):
    """Greedy decoding of an exported decoder with exact or quantized KV caches.

    Args:
        bundle: a loaded :class:`~tq.models.bundle.ModelBundle`.
        threads: ONNX Runtime intra-op threads (default: ORT's choice).
    """

    prefill_chunk = PREFILL_CHUNK

    def __init__(self, bundle: ModelBundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.name = bundle.name
        self.threads = threads
        self.session = bundle.session(threads)
        self._inputs = set(bundle.input_names)

    @classmethod
    def open(
        cls, path: str | os.PathLike, device: str = "cpu", dtype: str = "float32", threads: int | None = None
    ) -> OnnxRunner:
        """The runner of the bundle at ``path`` (device and dtype: the engine's only ones, cpu and
        float32, which :mod:`tq.engines.registry` checks)."""
        return cls(ModelBundle.load(path), threads)

    @property
    def files(self) -> ModelBundle:
        """The bundle (:class:`DecodeRunner`'s model files)."""
        return self.bundle

    def _empty_past(self, batch: int, cache: Caches | None) -> Past:
        shape = (batch, self.bundle.kv_heads, 0, self.bundle.head_dim)
        return [
            (np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.bundle.num_layers)
        ]

    def _forward(self, ids: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """One graph call: ids int64 [batch, s] after ``past`` -> (logits float32 [batch, s, vocab],
        presents).

        ``past`` holds one (key, value) pair per layer, each float32 [batch, kv_heads, past_len, d]
        (a batch of independent sequences of one length: one ONNX Runtime call for all of them);
        the presents have past_len + s positions.
        """
        batch, past_len = ids.shape[0], past[0][0].shape[2]
        if past[0][0].shape[0] != batch:
            raise ValueError(f"the past holds {past[0][0].shape[0]} sequences, input_ids {batch}")
        total = past_len + ids.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones((batch, total), np.int64)
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.repeat(np.arange(past_len, total, dtype=np.int64)[None, :], batch, 0)
        if "cache_position" in self._inputs:
            feeds["cache_position"] = np.arange(past_len, total, dtype=np.int64)
        if "use_cache_branch" in self._inputs:
            feeds["use_cache_branch"] = np.array([past_len > 0])
        for layer, (key, value) in enumerate(past):
            feeds[f"past_key_values.{layer}.key"] = key
            feeds[f"past_key_values.{layer}.value"] = value
        names = ["logits"] + [f"present.{i}.{kind}" for i in range(len(past)) for kind in ("key", "value")]
        outputs = self.session.run(names, feeds)
        presents = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(len(past))]
        return outputs[0], presents

    def _enter(self, cache: Caches | None, before: Past, after: Past) -> Past:
        """With ``cache``, the positions ``after`` has beyond ``before`` are quantized into it and
        the next call attends to their reconstruction (:meth:`quantize_presents`); without, to the
        exact presents."""
        return after if cache is None else self.quantize_presents(cache, after, before[0][0].shape[2])

    def new_cache(
        self, config: CacheConfig, layer_configs: dict[int, CacheConfig] | None = None
    ) -> MultiHeadKVCache:
        """An empty quantized cache shaped for this model."""
        b = self.bundle
        return MultiHeadKVCache(b.num_layers, b.kv_heads, b.head_dim, config, layer_configs)

    @staticmethod
    def quantize_presents(caches: Caches, presents: Past, past_len: int) -> Past:
        """Append positions past_len.. of the presents to the caches (all layers in one step per
        sequence) and return the past for the next call: the caches' reconstruction.

        ``caches`` is one :class:`MultiHeadKVCache` per sequence of the batch (a single cache for
        a batch of one). The graph's presents are the past it was given followed by the new
        positions, so only the positions that changed (the new ones, and any that just left the
        exact window) are overwritten with their reconstruction, in place: no copy of the whole
        cache per step.
        """
        caches = _cache_list(caches)
        if len(caches) != presents[0][0].shape[0]:
            raise ValueError(f"{len(caches)} caches for a batch of {presents[0][0].shape[0]} sequences")
        past = [(np.require(k, requirements="CW"), np.require(v, requirements="CW")) for k, v in presents]
        unchanged = [[min(layer.quantized_tokens, past_len) for layer in cache.layers] for cache in caches]
        with single_threaded_blas():  # a step's rotations are small; see single_threaded_blas
            append_batch(
                caches,
                [key[:, :, past_len:] for key, _ in past],
                [value[:, :, past_len:] for _, value in past],
            )
        for row, cache in enumerate(caches):
            for layer, (key, value), start in zip(cache.layers, past, unchanged[row], strict=True):
                key[row, :, start:] = layer.keys()[:, start:]
                value[row, :, start:] = layer.values()[:, start:]
        return past

    def join(self, pasts: Sequence[Past]) -> Past:
        """The per-layer keys and values of single sequences, concatenated along the batch."""
        return [
            tuple(np.concatenate([seq[layer][part] for seq in pasts]) for part in (0, 1))
            for layer in range(len(pasts[0]))
        ]

    def copy_past(self, past: Past) -> Past:
        return [(key.copy(), value.copy()) for key, value in past]

    def past_nbytes(self, past: Past) -> int:
        return sum(key.nbytes + value.nbytes for key, value in past)

"""The ONNX Runtime decode loop: exact and quantized KV caches in a real model.

Prefill runs the prompt in one call; then one token per call, feeding the graph's
``present.N.key/value`` back as ``past_key_values.N.key/value``. Inputs are fed by name
(``attention_mask``, ``position_ids = past + arange(s)``, ``cache_position`` and
``use_cache_branch`` where the graph has them).

In quantized mode the cache is a :class:`~tq.kvcache.MultiHeadKVCache`: each call's new keys and
values (``present`` beyond the past length) are appended, i.e. quantized once when they enter,
and the past given to ONNX Runtime is the cache's float reconstruction. What this does and does
not do: the stored cache is quantized, but ONNX Runtime still computes float attention; the
tokens of the current call attend to their own exact keys and values (the graph computes them),
which are quantized for later calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tq.kvcache import CacheConfig, MultiHeadKVCache

Past = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Generation:
    """One greedy (or teacher-forced) run.

    Attributes:
        tokens: the generated token ids (the prompt excluded).
        logits: float32 [len(tokens), vocab]; row t holds the logits that chose token t.
        prefill_seconds: wall time of the prompt call.
        decode_seconds: wall time of all later calls.
        kv_nbytes: bytes the cache stores at the end (fp32 for an exact run).
        kv_float_nbytes: bytes the same tokens take as fp32.
    """

    tokens: list[int]
    logits: np.ndarray
    prefill_seconds: float
    decode_seconds: float
    kv_nbytes: int
    kv_float_nbytes: int

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode calls (the first token comes from the prefill)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


class RealModelRunner:
    """Greedy decoding of an exported decoder with exact or quantized KV caches.

    Args:
        bundle: a loaded :class:`~tq.models.bundle.ModelBundle`.
        threads: ONNX Runtime intra-op threads (default: ORT's choice).
    """

    def __init__(self, bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.threads = threads
        self.session = bundle.session(threads)
        self._inputs = set(bundle.input_names)

    def _empty_past(self) -> Past:
        shape = (1, self.bundle.kv_heads, 0, self.bundle.head_dim)
        return [
            (np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.bundle.num_layers)
        ]

    def run(self, input_ids: Sequence[int], past: Past) -> tuple[np.ndarray, Past]:
        """One graph call: new tokens [s] after ``past`` -> (logits float32 [s, vocab], presents).

        ``past`` holds one (key, value) pair per layer, each float32 [1, kv_heads, past_len, d];
        the presents have past_len + s positions.
        """
        ids = np.asarray(input_ids, dtype=np.int64)[None, :]
        past_len = past[0][0].shape[2]
        total = past_len + ids.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.arange(past_len, total, dtype=np.int64)[None, :]
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
        return outputs[0][0], presents

    def new_cache(
        self, config: CacheConfig, layer_configs: dict[int, CacheConfig] | None = None
    ) -> MultiHeadKVCache:
        """An empty quantized cache shaped for this model."""
        b = self.bundle
        return MultiHeadKVCache(b.num_layers, b.kv_heads, b.head_dim, config, layer_configs)

    @staticmethod
    def quantize_presents(cache: MultiHeadKVCache, presents: Past, past_len: int) -> Past:
        """Append positions past_len.. of the presents to the cache (all layers in one step) and
        return the past for the next call: the cache's reconstruction.

        The graph's presents are the past it was given followed by the new positions, so only
        the positions that changed (the new ones, and any that just left the exact window) are
        overwritten with their reconstruction, in place: no copy of the whole cache per step.
        """
        unchanged = [min(layer.quantized_tokens, past_len) for layer in cache.layers]
        cache.append_all(
            [key[0, :, past_len:] for key, _ in presents], [value[0, :, past_len:] for _, value in presents]
        )
        past = []
        for layer, (key, value), start in zip(cache.layers, presents, unchanged, strict=True):
            key, value = np.require(key, requirements="CW"), np.require(value, requirements="CW")
            key[0, :, start:] = layer.keys()[:, start:]
            value[0, :, start:] = layer.values()[:, start:]
            past.append((key, value))
        return past

    def prefill(
        self, prompt_ids: Sequence[int], cache: MultiHeadKVCache | None = None
    ) -> tuple[np.ndarray, Past]:
        """Run the prompt: (logits [len(prompt), vocab], past for the next call)."""
        logits, presents = self.run(prompt_ids, self._empty_past())
        return logits, presents if cache is None else self.quantize_presents(cache, presents, 0)

    def extend(
        self, input_ids: Sequence[int], past: Past, cache: MultiHeadKVCache | None = None
    ) -> tuple[np.ndarray, Past]:
        """Run tokens after ``past``; quantize their keys and values into ``cache`` if given."""
        logits, presents = self.run(input_ids, past)
        return logits, presents if cache is None else self.quantize_presents(
            cache, presents, past[0][0].shape[2]
        )

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        cache: MultiHeadKVCache | None = None,
        forced_tokens: Sequence[int] | None = None,
        stop_at_eos: bool = True,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Greedy decoding, or teacher forcing when ``forced_tokens`` is given.

        With ``forced_tokens`` the run follows those tokens (len(forced_tokens) steps) and only
        records its logits, so that every step is comparable with the run that made them.
        """
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        steps = len(forced_tokens) if forced_tokens is not None else max_new_tokens
        if steps < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {steps}")
        start = time.perf_counter()
        logits, past = self.prefill(prompt_ids, cache)
        prefill_seconds = time.perf_counter() - start
        rows = [logits[-1]]
        tokens: list[int] = []
        start = time.perf_counter()
        while True:
            token = int(forced_tokens[len(tokens)]) if forced_tokens is not None else int(np.argmax(rows[-1]))
            tokens.append(token)
            if on_token is not None:
                on_token(len(tokens))
            done = len(tokens) >= steps or (
                forced_tokens is None and stop_at_eos and token in self.bundle.eos_token_ids
            )
            if done:
                break
            logits, past = self.extend([token], past, cache)
            rows.append(logits[-1])
        decode_seconds = time.perf_counter() - start
        if cache is None:
            kv_float = sum(k.nbytes + v.nbytes for k, v in past)
            kv_bytes = kv_float
        else:
            kv_bytes, kv_float = cache.nbytes, cache.float_nbytes
        return Generation(
            tokens, np.stack(rows).astype(np.float32), prefill_seconds, decode_seconds, kv_bytes, kv_float
        )

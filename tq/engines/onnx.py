"""The decode loop: exact and quantized KV caches in a real model.

:class:`DecodeRunner` is the loop every real-model benchmark drives (greedy generation, teacher
forcing); an engine implements its calls. :class:`RealModelRunner` is the ONNX Runtime engine
(below); :class:`tq.engines.transformers.TransformersRunner` runs the same loop
through Hugging Face transformers with :class:`~tq.engines.transformers_cache.TurboQuantCache`.

The ONNX Runtime engine:

Prefill runs the prompt in one call; then one token per call, feeding the graph's
``present.N.key/value`` back as ``past_key_values.N.key/value``. Inputs are fed by name
(``attention_mask``, ``position_ids = past + arange(s)``, ``cache_position`` and
``use_cache_branch`` where the graph has them).

In quantized mode the cache is a :class:`~tq.cache.kvcache.MultiHeadKVCache`: each call's new keys and
values (``present`` beyond the past length) are appended, i.e. quantized once when they enter,
and the past given to ONNX Runtime is the cache's float reconstruction. What this does and does
not do: the stored cache is quantized, but ONNX Runtime still computes float attention; the
tokens of the current call attend to their own exact keys and values (the graph computes them),
which are quantized for later calls.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tq.cache.kvcache import CacheConfig, MultiHeadKVCache, append_batch
from tq.kernels.cpu import single_threaded_blas

Past = list[tuple[np.ndarray, np.ndarray]]
# Prompt tokens per prefill call. Measured on SmolLM2-135M, 2 threads: a 4096-token prompt takes
# 27.8 s in one call and 14.6 s in calls of 512 (the same logits to the bit); 1024 tokens 2.5 s
# vs 2.2 s.
PREFILL_CHUNK = 512
# One quantized cache per sequence of a batch; a single cache stands for a batch of one.
Caches = MultiHeadKVCache | Sequence[MultiHeadKVCache]


def _cache_list(caches: Caches) -> list[MultiHeadKVCache]:
    return [caches] if isinstance(caches, MultiHeadKVCache) else list(caches)


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


class DecodeRunner(ABC):
    """The decode loop over an engine's calls: what the benchmarks drive.

    An engine keeps its own ``past`` (what the next call attends to: arrays for ONNX Runtime, a
    transformers cache) and its own per-sequence quantized cache (:meth:`new_cache`: an object
    with ``nbytes`` and ``float_nbytes``). :meth:`extend` and :meth:`quantize_presents` may
    consume the past they are given: :meth:`copy_past` keeps one for later.

    Attributes:
        files: the model's directory (:class:`~tq.models.bundle.ModelBundle` or
            :class:`~tq.models.checkpoint.Checkpoint`): tokenizer, end-of-sequence tokens.
        name: the model's name in records (default: the directory's).
    """

    files: Any
    name: str

    @abstractmethod
    def new_cache(self, config: CacheConfig, layer_configs: dict[int, CacheConfig] | None = None) -> Any:
        """An empty quantized cache for one sequence of this model."""

    @abstractmethod
    def prefill(self, prompt_ids: Sequence[int] | np.ndarray, cache: Any = None) -> tuple[np.ndarray, Any]:
        """Run the prompt ([s], or [batch, s] with one cache for the batch): (logits float32
        [s, vocab] or [batch, s, vocab], past). The prompt's tokens attend exactly to each other;
        with ``cache`` they are then quantized into it, and the past is the cache's."""

    @abstractmethod
    def extend(
        self, input_ids: Sequence[int] | np.ndarray, past: Any, cache: Any = None
    ) -> tuple[np.ndarray, Any]:
        """Run tokens after ``past``: (logits, the past that includes them); with ``cache``, their
        keys and values are quantized into it."""

    @abstractmethod
    def quantize_presents(self, caches: Any, presents: Any, past_len: int) -> Any:
        """Quantize positions past_len.. of an exact past into ``caches``; return the past that
        attends to their reconstruction."""

    @abstractmethod
    def join(self, pasts: Sequence[Any]) -> Any:
        """One past for a batch from the pasts of single sequences of one length."""

    @abstractmethod
    def copy_past(self, past: Any) -> Any:
        """An independent copy of a past (extend and quantize_presents may consume theirs)."""

    @abstractmethod
    def past_nbytes(self, past: Any) -> int:
        """Bytes an exact past holds (its keys and values)."""

    def teacher_force(
        self,
        prompts: np.ndarray,
        forced: np.ndarray,
        caches: Sequence[Any] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Decode ``batch`` independent sequences token by token along given tokens.

        Each prompt of ``prompts`` (int [batch, p]) is prefilled in a call of its own (a prefill is
        bound by computation, so batching it gains nothing and costs memory); then every step feeds
        the next forced token of every sequence (``forced`` int [batch, steps]) in one call, so the
        model's weights are read once per step for the whole batch. With ``caches`` (one per
        sequence) every new token's keys and values are quantized as they enter.

        Returns:
            float32 [batch, steps, vocab]: row t of a sequence holds the logits that predict
            ``forced[:, t]`` (row 0 from the prefill), as :meth:`generate` with ``forced_tokens``.
        """
        prompts, forced = np.asarray(prompts, np.int64), np.asarray(forced, np.int64)
        if (
            prompts.ndim != 2
            or forced.ndim != 2
            or prompts.shape[0] != forced.shape[0]
            or prompts.shape[1] == 0
        ):
            raise ValueError(
                f"need prompts [batch, p >= 1] and forced tokens [batch, steps], got {prompts.shape} and "
                f"{forced.shape}"
            )
        batch, steps = forced.shape
        if caches is not None and len(caches) != batch:
            raise ValueError(f"{len(caches)} caches for a batch of {batch} sequences")
        rows, pasts = [], []
        for index, prompt in enumerate(prompts):
            logits, past = self.prefill(prompt, None if caches is None else caches[index])
            rows.append(logits[-1])
            pasts.append(past)
        past = self.join(pasts)
        out = np.empty((batch, steps, rows[0].shape[-1]), np.float32)
        out[:, 0] = rows
        for step in range(1, steps):
            logits, past = self.extend(forced[:, step - 1 : step], past, caches)
            out[:, step] = logits[:, -1]
            if on_step is not None:
                on_step(step)
        return out

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        cache: Any = None,
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
                forced_tokens is None and stop_at_eos and token in self.files.eos_token_ids
            )
            if done:
                break
            logits, past = self.extend([token], past, cache)
            rows.append(logits[-1])
        decode_seconds = time.perf_counter() - start
        if cache is None:
            kv_bytes = kv_float = self.past_nbytes(past)
        else:
            kv_bytes, kv_float = cache.nbytes, cache.float_nbytes
        return Generation(
            tokens, np.stack(rows).astype(np.float32), prefill_seconds, decode_seconds, kv_bytes, kv_float
        )


class RealModelRunner(DecodeRunner):
    """Greedy decoding of an exported decoder with exact or quantized KV caches.

    Args:
        bundle: a loaded :class:`~tq.models.bundle.ModelBundle`.
        threads: ONNX Runtime intra-op threads (default: ORT's choice).
    """

    def __init__(self, bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.name = bundle.name
        self.threads = threads
        self.session = bundle.session(threads)
        self._inputs = set(bundle.input_names)

    @property
    def files(self):
        """The bundle (:class:`DecodeRunner`'s model files)."""
        return self.bundle

    def _empty_past(self, batch: int = 1) -> Past:
        shape = (batch, self.bundle.kv_heads, 0, self.bundle.head_dim)
        return [
            (np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.bundle.num_layers)
        ]

    def run(self, input_ids: Sequence[int] | np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """One graph call: new tokens after ``past`` -> (logits float32, presents).

        ``input_ids`` is [s] (one sequence) or [batch, s] (independent sequences of one length,
        one ONNX Runtime call for all of them); the logits are [s, vocab] or [batch, s, vocab].
        ``past`` holds one (key, value) pair per layer, each float32 [batch, kv_heads, past_len, d];
        the presents have past_len + s positions.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        single = ids.ndim == 1
        ids = ids[None, :] if single else ids
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [s] or [batch, s] with s >= 1, got shape {ids.shape}")
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
        return (outputs[0][0] if single else outputs[0]), presents

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

    def prefill(
        self, prompt_ids: Sequence[int] | np.ndarray, cache: Caches | None = None
    ) -> tuple[np.ndarray, Past]:
        """Run the prompt(s) ([s] or [batch, s]): (logits, past for the next call).

        The prompt runs in calls of :data:`PREFILL_CHUNK` tokens, each attending exactly to
        the keys and values of the chunks before it (what one call computes, in less time);
        with ``cache``, every prompt token is then quantized into it at once.
        """
        ids = np.asarray(prompt_ids)
        past = self._empty_past(1 if ids.ndim == 1 else ids.shape[0])
        parts = []
        for start in range(0, max(ids.shape[-1], 1), PREFILL_CHUNK):
            logits, past = self.run(ids[..., start : start + PREFILL_CHUNK], past)
            parts.append(logits)
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-2)
        return logits, past if cache is None else self.quantize_presents(cache, past, 0)

    def extend(
        self, input_ids: Sequence[int] | np.ndarray, past: Past, cache: Caches | None = None
    ) -> tuple[np.ndarray, Past]:
        """Run tokens after ``past``; quantize their keys and values into ``cache`` if given."""
        logits, presents = self.run(input_ids, past)
        return logits, presents if cache is None else self.quantize_presents(
            cache, presents, past[0][0].shape[2]
        )

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

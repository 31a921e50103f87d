"""The decode loop every engine shares: :class:`DecodeRunner`, and :class:`Generation`, one run.

The loop is written once, here: prefill (in chunks where the engine asks for them), extend,
greedy decoding and teacher forcing (:meth:`DecodeRunner.generate`), batched teacher forcing
(:meth:`DecodeRunner.teacher_force`), and the checks of token ids. An engine implements its
forward call and its cache plumbing (the abstract methods): :class:`tq.engines.onnx.OnnxRunner`
(ONNX Runtime on an exported bundle) and :class:`tq.engines.transformers.TransformersRunner`
(Hugging Face transformers on a checkpoint).

The protocol of every call: its tokens attend to the earlier tokens' past (with a quantized
cache, their reconstruction) and to their own exact keys and values, computed in the call; after
the call they enter the cache (:meth:`DecodeRunner._enter`), so a token is exact for its own call
and quantized for the later ones.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tq.cache.config import CacheConfig


def token_batch(input_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, bool]:
    """(ids int64 [batch, s], whether ``input_ids`` was one sequence [s]).

    Raises:
        ValueError: not [s] or [batch, s] with s >= 1.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    single = ids.ndim == 1
    ids = ids[None, :] if single else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [s] or [batch, s] with s >= 1, got shape {ids.shape}")
    return ids, single


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
        prefill_chunk: prompt tokens per prefill call, each chunk attending exactly to the ones
            before it (None: the whole prompt in one call).
    """

    files: Any
    name: str
    prefill_chunk: int | None = None

    # --- what an engine implements -------------------------------------------------------------

    @classmethod
    @abstractmethod
    def open(cls, path: str | os.PathLike, device: str, dtype: str, threads: int | None) -> DecodeRunner:
        """The runner of the model directory ``path`` (what the engine reads: a bundle or a
        checkpoint) on ``device`` in ``dtype``, with ``threads`` CPU threads (None: the
        library's choice)."""

    @abstractmethod
    def new_cache(self, config: CacheConfig, layer_configs: dict[int, CacheConfig] | None = None) -> Any:
        """An empty quantized cache for one sequence of this model."""

    @abstractmethod
    def _empty_past(self, batch: int, cache: Any) -> Any:
        """The past a prefill of ``batch`` sequences starts from (no tokens); ``cache`` is the
        cache the prompt will enter (or None)."""

    @abstractmethod
    def _forward(self, ids: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        """One model call: ids int64 [batch, s] (s >= 1) after ``past`` -> (logits float32
        [batch, s, vocab], the past followed by the call's tokens)."""

    @abstractmethod
    def _enter(self, cache: Any, before: Any, after: Any) -> Any:
        """After a call from past ``before`` to ``after``: put the call's tokens into ``cache``
        (None: no cache) and return the past the next call attends to."""

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

    # --- the loop, written once ----------------------------------------------------------------

    def prefill(self, prompt_ids: Sequence[int] | np.ndarray, cache: Any = None) -> tuple[np.ndarray, Any]:
        """Run the prompt ([s], or [batch, s] with one cache for the batch): (logits float32
        [s, vocab] or [batch, s, vocab], past).

        The prompt runs in calls of :attr:`prefill_chunk` tokens, each attending exactly to the
        keys and values of the chunks before it; with ``cache``, every prompt token then enters
        it, and the past is the cache's.
        """
        ids, single = token_batch(prompt_ids)
        start = past = self._empty_past(ids.shape[0], cache)
        chunk = self.prefill_chunk or ids.shape[1]
        parts = []
        for first in range(0, ids.shape[1], chunk):
            logits, past = self._forward(ids[:, first : first + chunk], past)
            parts.append(logits)
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return (logits[0] if single else logits), self._enter(cache, start, past)

    def extend(
        self, input_ids: Sequence[int] | np.ndarray, past: Any, cache: Any = None
    ) -> tuple[np.ndarray, Any]:
        """Run tokens ([s] or [batch, s]) after ``past`` in one call: (logits float32 [s, vocab]
        or [batch, s, vocab], the past that includes them); with ``cache``, they enter it."""
        ids, single = token_batch(input_ids)
        logits, presents = self._forward(ids, past)
        return (logits[0] if single else logits), self._enter(cache, past, presents)

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
        past: Any = None,
    ) -> Generation:
        """Greedy decoding, or teacher forcing when ``forced_tokens`` is given.

        With ``forced_tokens`` the run follows those tokens (len(forced_tokens) steps) and only
        records its logits, so that every step is comparable with the run that made them. With
        ``past``, ``prompt_ids`` continue it (one :meth:`extend` call, timed as the prefill)
        instead of starting a prefill.
        """
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        steps = len(forced_tokens) if forced_tokens is not None else max_new_tokens
        if steps < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {steps}")
        start = time.perf_counter()
        if past is None:
            logits, past = self.prefill(prompt_ids, cache)
        else:
            logits, past = self.extend(prompt_ids, past, cache)
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

"""Needle in a haystack: can the model still find one fact in a long context through a quantized cache?

Each prompt is Wikipedia filler (:func:`tq.data.corpus.corpus_text`, a different place in the text per
trial) of about ``context_length`` tokens in all, with one *needle* sentence, ``The secret
number of <city> is <5-digit number>.``, inserted at a sentence boundary at the requested depth
(a fraction of the filler tokens before it), then a question asking for the number. Chat models
(a model with a chat template) get the prompt as one user turn of their own chat format
(:mod:`tq.models.chat`, shared with the real-model workload) and answer in the assistant turn;
other models get the plain text with ``Answer:`` at the end.
The city, the number and the place in the text are drawn from ``(seed, context_length, trial)``,
so one trial's haystack and needle are the same at every depth: only the depth changes.

Protocol, per prompt (greedy decoding, at most ``max_new_tokens``, stopping at EOS):

1. The context (chat header, instructions and haystack with the needle) is prefilled in one
   exact graph call; its attention is exact (the graph computes it), as in any decode loop.
2. Exact run: the question and the generation prompt are fed in one call against the exact past,
   then the answer is decoded token by token.
3. Quantized run: the same prefill's keys and values enter a :class:`~tq.cache.kvcache.MultiHeadKVCache`
   (every context token quantized, exactly what ``OnnxRunner.prefill(ids, cache)`` does,
   without running the graph twice); the question then reads the haystack only through the
   quantized cache, and every later token's keys and values are quantized as they enter.

Score: retrieval = the needle's number appears as a whole number in the decoded answer
(thousands groups written with a comma or a space count: ``48,213`` is 48213). Reported per
(context length, depth) and overall, for both runs, with how often the two runs agree.

Cost: one prefill per prompt, shared by the exact run and, in :func:`run_needle_sweep`, by every
cache configuration, and one short answer per run. On SmolLM2-135M with 2 threads a prefill
(in 512-token calls, :data:`tq.engines.onnx.PREFILL_CHUNK`) takes about 2 s at 1k tokens and 15 s at
4k; the trials are not batched, since a prefill is bound by computation, not by reading weights.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tq.cache.config import CacheConfig, exact_layers
from tq.engines.base import DecodeRunner
from tq.engines.source import ModelSource
from tq.models.chat import PromptFormat
from tq.tasks.records import make_record
from tq.tasks.synthetic import Progress

DEFAULT_CONTEXT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_TRIALS = 4
DEFAULT_MAX_NEW_TOKENS = 24

NEEDLE = "The secret number of {name} is {number}."
# The instruction opens the user message (RULER-style: say up front what is hidden); the
# question follows the haystack.
INSTRUCTION = (
    "A secret number is hidden in the following text. Memorize it: you will be asked for it afterwards."
)
QUESTION = "What is the secret number of {name} mentioned in the text above?"
# Plain (non-chat) models: the question is followed by this, and the answer continues it.
PLAIN_ANSWER = "Answer:"
NAMES = (
    "Lisbon", "Nairobi", "Osaka", "Bergen", "Cordoba", "Tbilisi", "Hanoi", "Valparaiso", "Krakow",
    "Adelaide", "Quebec", "Marrakesh", "Tallinn", "Cusco", "Bilbao", "Seville", "Zanzibar",
    "Ljubljana", "Reykjavik", "Winnipeg", "Porto", "Dakar", "Salzburg", "Kyoto", "Antwerp",
    "Havana", "Lhasa", "Montevideo", "Trieste", "Halifax",
)  # fmt: skip
NUMBER_RANGE = (10000, 100000)  # five digits, no leading zero
# The haystack ends at the last sentence boundary before its token budget, unless that would
# drop more than this many tokens; then it is cut at the budget.
_MAX_END_SLACK = 96
# Characters of filler encoded per token needed, with a wide margin (English BPE: about 4-5).
_CHARS_PER_TOKEN = 8
_SENTENCE_END = re.compile(r"[.!?]['\")\]]?\s*$|\n\s*$")


class NeedleError(ValueError):
    """Bad needle-in-a-haystack input: depths, context lengths, trials, or a too-short text."""


def max_positions(bundle: Any) -> int | None:
    """The model's position limit (tokens) from its ``config.json``: ``max_position_embeddings``
    or ``n_positions`` (also under ``text_config``); None if the config states none."""
    path = bundle.path / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for scope in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions"):
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def retrieved(answer: str, number: str) -> bool:
    """Whether ``number`` (a string of digits) appears as a whole number in ``answer``.

    Thousands groups written with a comma or a space (``48,213``, ``48 213``) count as one
    number; a longer number that contains it (``148213``) does not count.
    """
    joined = re.sub(r"(?<=\d)[, ](?=\d{3}(?!\d))", "", answer)
    return number in re.findall(r"\d+", answer) or number in re.findall(r"\d+", joined)


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle-in-a-haystack prompt, as token ids.

    The full prompt is ``context_ids + query_ids``: the context (chat header, instruction,
    haystack with the needle) is what the cache holds before the question; the query is the
    question and the generation prompt. Positions are token indices into the full prompt.

    Attributes:
        context_ids, query_ids: token ids.
        context_length: the requested prompt length in tokens (``length`` is at most this).
        trial: the trial number (with the seed and context_length, it draws the needle and text).
        name, number: the needle's city and its secret number (5 digits, as text).
        depth: the requested depth, a fraction in (0, 1) of the filler tokens before the needle.
        haystack_start: index of the first filler token.
        needle_start: index of the needle's first token.
        needle_tokens: the needle's length in tokens.
        filler_tokens: the number of filler tokens (the needle excluded).
        text_offset: the character offset in the corpus text where this trial's filler starts.
    """

    context_ids: list[int]
    query_ids: list[int]
    context_length: int
    trial: int
    name: str
    number: str
    depth: float
    haystack_start: int
    needle_start: int
    needle_tokens: int
    filler_tokens: int
    text_offset: int

    @property
    def ids(self) -> list[int]:
        """The whole prompt: ``context_ids + query_ids``."""
        return self.context_ids + self.query_ids

    @property
    def length(self) -> int:
        """Prompt tokens in all."""
        return len(self.context_ids) + len(self.query_ids)

    @property
    def actual_depth(self) -> float:
        """The fraction of the filler tokens that come before the needle."""
        return (self.needle_start - self.haystack_start) / self.filler_tokens


class NeedlePromptBuilder:
    """Builds needle prompts (:class:`NeedlePrompt`) for one model's tokenizer and chat format.

    Args:
        bundle: a model's files (:class:`~tq.models.bundle.ModelBundle` or
            :class:`~tq.models.checkpoint.Checkpoint`).
        text: the filler text (default: :func:`tq.data.corpus.corpus_text` ``(cache)``).
        cache: the cache root for the corpus (None: ``$TQ_CACHE_DIR`` or ``~/.cache/tq``).
    """

    def __init__(self, bundle: Any, text: str | None = None, cache: str | os.PathLike | None = None) -> None:
        if text is None:
            from tq.data.corpus import corpus_text

            text = corpus_text(cache)
        self.bundle = bundle
        self.text = text
        self._tokenizer = bundle.tokenizer()
        # Paragraph starts: where a trial's filler may begin.
        self._paragraphs = np.array([0] + [m.end() for m in re.finditer(r"\n\n+", text)], dtype=np.int64)
        # The chat format's header, after any BOS the tokenizer puts in front unless the
        # template writes it (tq.models.chat); plain models: that BOS only.
        chat = PromptFormat(bundle, "chat")
        self.chat = chat.chat
        self._head = chat.head_ids + self._encode(INSTRUCTION + "\n\n")
        self._tail = chat.tail if chat.chat else "\n" + PLAIN_ANSWER

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def _filler(self, offset: int, tokens: int) -> tuple[list[int], list[int]]:
        """At least ``tokens`` filler tokens from character ``offset`` on, and the token indices
        where a sentence (or a line) begins: places where the needle can go or the text can end."""
        chars = max(tokens * _CHARS_PER_TOKEN, 256)
        while True:
            chunk = self.text[offset : offset + chars]
            encoding = self._tokenizer.encode(chunk, add_special_tokens=False)
            if len(encoding.ids) > tokens or offset + chars >= len(self.text):
                break
            chars *= 2
        ids = encoding.ids
        if len(ids) <= tokens:
            raise NeedleError(
                f"the filler text is too short: {tokens} tokens needed from offset {offset}, "
                f"{len(ids)} available"
            )
        boundaries = [
            index
            for index, (start, _) in enumerate(encoding.offsets[: tokens + 1])
            if index > 0 and _SENTENCE_END.search(chunk[:start][-8:] if start else "")
        ]
        return ids, boundaries

    def build(self, context_length: int, depth: float, trial: int, seed: int = 0) -> NeedlePrompt:
        """The prompt of one trial: ``context_length`` tokens at most (a little less when the
        filler ends at a sentence boundary), the needle at the sentence boundary nearest
        ``depth`` of the filler.

        Raises:
            NeedleError: depth outside (0, 1), or a context length too short for the template,
                the needle, the question and some filler.
        """
        if not 0.0 < depth < 1.0:
            raise NeedleError(f"depth must be in (0, 1), got {depth}")
        rng = np.random.default_rng([seed, context_length, trial])
        name = NAMES[int(rng.integers(len(NAMES)))]
        number = str(int(rng.integers(*NUMBER_RANGE)))
        needle = self._encode(" " + NEEDLE.format(name=name, number=number))
        query = self._encode("\n\n" + QUESTION.format(name=name) + self._tail)
        budget = context_length - len(self._head) - len(needle) - len(query)
        if budget < 32:
            raise NeedleError(
                f"context length {context_length} is too short: the template, needle and question "
                f"take {context_length - budget} tokens, and at least 32 tokens of filler are needed"
            )
        # A paragraph start drawn uniformly among those that leave room for the filler.
        room = len(self.text) - budget * _CHARS_PER_TOKEN
        candidates = self._paragraphs[self._paragraphs <= max(room, 0)]
        offset = int(candidates[rng.integers(len(candidates))])
        ids, boundaries = self._filler(offset, budget)
        ends = [index for index in boundaries if index <= budget]
        end = ends[-1] if ends and ends[-1] >= budget - _MAX_END_SLACK else budget
        inside = [index for index in boundaries if index < end] or [round(depth * end)]
        cut = min(inside, key=lambda index: (abs(index - depth * end), index))
        haystack = ids[:cut] + needle + ids[cut:end]
        start = len(self._head)
        return NeedlePrompt(
            context_ids=self._head + haystack,
            query_ids=query,
            context_length=context_length,
            trial=trial,
            name=name,
            number=number,
            depth=depth,
            haystack_start=start,
            needle_start=start + cut,
            needle_tokens=len(needle),
            filler_tokens=end,
            text_offset=offset,
        )


def _answer(
    runner: DecodeRunner, past: Any, query_ids: Sequence[int], max_new_tokens: int, cache: Any
) -> tuple[list[int], float]:
    """Greedy answer after ``past`` (:meth:`~tq.engines.base.DecodeRunner.generate`: the query
    in one call, then one token per call).

    Returns (generated token ids, at most ``max_new_tokens``, stopping at EOS; seconds).
    """
    run = runner.generate(query_ids, max_new_tokens, cache, past=past)
    return run.tokens, run.prefill_seconds + run.decode_seconds


def _select(rows: Sequence[dict[str, Any]], length: int | None, depth: float | None) -> list[dict[str, Any]]:
    return [
        row
        for row in rows
        if (length is None or row["context_length"] == length) and (depth is None or row["depth"] == depth)
    ]


def _rates(
    rows: Sequence[dict[str, Any]], length: int | None = None, depth: float | None = None
) -> dict[str, Any]:
    """Retrieval rates of the exact and quantized runs and their agreement, over the trials of
    one context length and depth (None: all)."""
    chosen = _select(rows, length, depth)
    return {
        "trials": len(chosen),
        "exact_retrieval": float(np.mean([row["exact_retrieved"] for row in chosen])),
        "quantized_retrieval": float(np.mean([row["quantized_retrieved"] for row in chosen])),
        # Both found the number, or both missed it.
        "retrieval_agreement": float(
            np.mean([row["exact_retrieved"] == row["quantized_retrieved"] for row in chosen])
        ),
        # The very same answer tokens.
        "answer_agreement": float(np.mean([row["same_answer"] for row in chosen])),
    }


def _timing(rows: Sequence[dict[str, Any]], length: int | None = None) -> dict[str, float]:
    """Mean seconds per prompt: the shared exact prefill, quantizing its keys and values, and
    each run's answer (question call + decoding); decode speed in generated tokens per second."""
    chosen = _select(rows, length, None)
    timing = {
        key: float(np.mean([row[key] for row in chosen]))
        for key in ("prefill_seconds", "quantize_seconds", "exact_answer_seconds", "quantized_answer_seconds")
    }
    for mode in ("exact", "quantized"):
        answer_seconds = sum(row[f"{mode}_answer_seconds"] for row in chosen)
        generated = sum(row[f"{mode}_tokens"] for row in chosen)
        timing[f"{mode}_answer_tokens_per_s"] = (
            generated / answer_seconds if answer_seconds > 0 else float("nan")
        )
    return timing


def _check_inputs(
    context_lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    max_new_tokens: int,
    limit: int | None,
) -> None:
    if not context_lengths:
        raise NeedleError("no context lengths given")
    if not depths:
        raise NeedleError("no depths given")
    for length in context_lengths:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise NeedleError(f"context lengths must be positive integers, got {length!r}")
        if limit is not None and length + max_new_tokens > limit:
            raise NeedleError(
                f"context length {length} plus {max_new_tokens} new tokens exceeds the model's "
                f"{limit} positions"
            )
    for depth in depths:
        if not 0.0 < depth < 1.0:
            raise NeedleError(f"depths must be in (0, 1) (a fraction of the filler), got {depth}")
    if len(set(context_lengths)) != len(context_lengths) or len(set(depths)) != len(depths):
        raise NeedleError("context lengths and depths must not repeat")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise NeedleError(f"trials must be a positive integer, got {trials!r}")
    if max_new_tokens < 1:
        raise NeedleError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def run_needle(
    model: str | os.PathLike | ModelSource,
    config: CacheConfig,
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    exact_first_layers: int = 0,
    exact_last_layers: int = 0,
    threads: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    text: str | None = None,
    exact_layer_set: Sequence[int] = (),
) -> dict[str, Any]:
    """Needle retrieval with the exact and the quantized cache; return a ``real-model`` record.

    Args:
        model: the model and its engine (a path: a model bundle, ``tq model prepare``).
        config: the quantized cache's configuration (layers in ``exact_*_layers`` and
            ``exact_layer_set`` stay exact).
        context_lengths: prompt lengths in tokens (each at most the model's positions minus
            ``max_new_tokens``).
        depths: needle depths, fractions in (0, 1) of the filler tokens before the needle.
        trials: prompts per (length, depth), each with its own needle and place in the text.
        max_new_tokens: the longest answer, in tokens.
        threads: the engine's intra-op threads (None: its default).
        seed: draws the needles and the places in the text (the cache's rotations use
            ``config.seed``).
        cache: the cache root for the corpus text (None: ``$TQ_CACHE_DIR`` or ``~/.cache/tq``).
        text: filler text to use instead of the corpus (tests).

    Raises:
        NeedleError: bad depths, lengths (too short for the template, or beyond the model's
            positions), trials or max_new_tokens.
    """
    return run_needle_sweep(
        model, [config], context_lengths, depths, trials, max_new_tokens, exact_first_layers,
        exact_last_layers, threads, seed, cache, text, exact_layer_set,
    )[0]  # fmt: skip


def run_needle_sweep(
    model: str | os.PathLike | ModelSource,
    configs: Sequence[CacheConfig],
    context_lengths: Sequence[int] = DEFAULT_CONTEXT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    exact_first_layers: int = 0,
    exact_last_layers: int = 0,
    threads: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    text: str | None = None,
    exact_layer_set: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """:func:`run_needle` for several cache configurations at once: one record per config.

    The exact side of a prompt (its prefill, which dominates the cost at long contexts, and the
    exact answer) is computed once and shared by every configuration; each one then quantizes
    its own copy of the prefill's keys and values and answers through it. The records are what
    separate :func:`run_needle` calls would give (the same prompts, the same exact answers);
    their ``seconds`` is the whole sweep's, and ``config_seconds`` this configuration's share
    (quantizing and answering).
    """
    if not configs:
        raise NeedleError("no cache configurations given")
    context_lengths = [int(length) for length in context_lengths]
    depths = [float(depth) for depth in depths]
    source = ModelSource.of(model)
    runner = source.open(threads)
    bundle = runner.files
    _check_inputs(context_lengths, depths, trials, max_new_tokens, max_positions(bundle))
    builder = NeedlePromptBuilder(bundle, text, cache)
    layer_configs = exact_layers(bundle.num_layers, exact_first_layers, exact_last_layers, exact_layer_set)
    # Every prompt first: a length too short for the template fails before any model call.
    prompts = [
        builder.build(length, depth, trial, seed)
        for length in context_lengths
        for depth in depths
        for trial in range(trials)
    ]
    progress = Progress("tq bench needle")
    rows: list[list[dict[str, Any]]] = [[] for _ in configs]
    kv_bytes = [[0, 0] for _ in configs]
    config_seconds = [0.0 for _ in configs]
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        tick = time.perf_counter()
        _, presents = runner.prefill(prompt.context_ids)
        prefill_s = time.perf_counter() - tick
        # extend and quantize_presents may consume the past they are given: the exact answer
        # and every config but the last one take a copy of the prefill's.
        exact, exact_s = _answer(runner, runner.copy_past(presents), prompt.query_ids, max_new_tokens, None)
        exact_text = bundle.decode(exact)
        marks = []
        for number, config in enumerate(configs):
            kv = runner.new_cache(config, layer_configs)
            tick = time.perf_counter()
            own = presents if number == len(configs) - 1 else runner.copy_past(presents)
            past = runner.quantize_presents(kv, own, 0)
            quantize_s = time.perf_counter() - tick
            quantized, quantized_s = _answer(runner, past, prompt.query_ids, max_new_tokens, kv)
            config_seconds[number] += quantize_s + quantized_s
            kv_bytes[number][0] += kv.nbytes
            kv_bytes[number][1] += kv.float_nbytes
            quantized_text = bundle.decode(quantized)
            rows[number].append(
                {
                    "context_length": prompt.context_length,
                    "depth": prompt.depth,
                    "trial": prompt.trial,
                    "name": prompt.name,
                    "number": prompt.number,
                    "prompt_tokens": prompt.length,
                    "needle_position": prompt.needle_start,
                    "actual_depth": prompt.actual_depth,
                    "text_offset": prompt.text_offset,
                    "exact_answer": exact_text,
                    "quantized_answer": quantized_text,
                    "exact_retrieved": retrieved(exact_text, prompt.number),
                    "quantized_retrieved": retrieved(quantized_text, prompt.number),
                    "same_answer": exact == quantized,
                    "exact_tokens": len(exact),
                    "quantized_tokens": len(quantized),
                    "prefill_seconds": prefill_s,
                    "quantize_seconds": quantize_s,
                    "exact_answer_seconds": exact_s,
                    "quantized_answer_seconds": quantized_s,
                }
            )
            marks.append({True: "found", False: "missed"}[rows[number][-1]["quantized_retrieved"]])
        progress(
            f"{index + 1}/{len(prompts)} length {prompt.context_length} depth {prompt.depth} "
            f"trial {prompt.trial}: exact {'found' if retrieved(exact_text, prompt.number) else 'missed'}, "
            f"quantized {', '.join(marks)}"
        )
    seconds = time.perf_counter() - start
    shared = {
        "workload": "needle",
        **source.describe(),
        "model": runner.name,
        "context_lengths": context_lengths,
        "depths": depths,
        "trials": trials,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "threads": threads,
    }
    details = {
        "exact_layers": sorted(layer_configs),
        "chat_format": builder.chat,
        "needle": NEEDLE,
        "question": QUESTION,
        "text": "Wikipedia excerpt of the gensim wheel (tq.data.corpus)" if text is None else "given text",
        "note": "The context is prefilled once with exact attention; the quantized run stores every "
        "context token quantized and the question and answer read the haystack through that cache.",
    }
    return [
        _needle_record(
            shared | {"cache": config.describe()} | details,
            rows[number],
            kv_bytes[number],
            {
                "seconds": seconds,
                "config_seconds": config_seconds[number],
                "configs_sharing_prefill": len(configs),
            },
        )
        for number, config in enumerate(configs)
    ]


def _needle_record(
    record_config: dict[str, Any], rows: list[dict[str, Any]], kv_bytes: list[int], seconds: dict[str, float]
) -> dict[str, Any]:
    """One configuration's record from its per-prompt rows."""
    context_lengths, depths = record_config["context_lengths"], record_config["depths"]
    kv_nbytes, kv_float = kv_bytes
    cells = [
        {"context_length": length, "depth": depth, **_rates(rows, length, depth)}
        for length in context_lengths
        for depth in depths
    ]
    metrics = {
        **_rates(rows),
        "by_length": {str(length): _rates(rows, length) for length in context_lengths},
        "cells": cells,
        "kv_nbytes": kv_nbytes,
        "kv_float_nbytes": kv_float,
        "kv_compression_ratio": kv_float / kv_nbytes if kv_nbytes else 1.0,
        "trials": rows,
    }
    timing = {
        **seconds,
        "by_length": {str(length): _timing(rows, length) for length in context_lengths},
        **_timing(rows),
    }
    return make_record("real-model", record_config, metrics, timing, record_config["threads"] or 0)

"""Perplexity on real text (the Wikipedia excerpt of :mod:`tq.data.corpus`), exact vs quantized cache.

The text: ``windows`` windows of ``window`` tokens drawn across the corpus's articles from
``sample_seed`` (:func:`tq.data.corpus.draw_windows`: one window per article while articles remain,
none crossing an article's end); the record lists each window's article title and token offset.
Each window is split into a context of ``context`` tokens and a scored continuation of
window - context tokens. The exact side is the model's run on the whole window in one call
(:func:`perplexity_reference`; one :class:`~tq.tasks.exact_run.ExactReference` per model and window set
(sample_seed, windows, window, context), computed once and shared by every cache setting, so
that every setting is scored on the same windows). The quantized side has two protocols:

- ``decode`` (default; docs/design.md section 10): tokens 0..context-1 are prefilled, then the
  continuation is decoded one token at a time with teacher forcing, every new token's keys and
  values quantized as they enter the cache: what a decoding server with a quantized cache sees.
  ``batch`` windows are decoded together, one engine call per step for all of them
  (:meth:`~tq.engines.base.DecodeRunner.teacher_force`).
- ``window`` ("quantized context only"; two calls per window): tokens 0..context-2 are prefilled
  (exact attention) and their keys and values go into the quantized cache; one more call feeds
  tokens context-1..window-2 against that cache. The scored tokens attend to each other's exact
  keys and values (the graph computes them within the call), so only the context is quantized.

Metrics (:func:`tq.tasks.stats.quality_summary`): exact and quantized perplexity and their ratio,
KL(exact || quantized) with median, p99 and maximum, top-1 agreement, and the change in the
probability of the true next token; each a mean over the scored tokens with its standard error
over windows (``<name>_se``, the window as the unit) and per token (``<name>_se_token``). The
record keeps every window's means (``per_window``, for paired comparisons between settings) and
the per-token values with their window (``per_token``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tq.cache.config import CacheConfig, exact_layers
from tq.engines.base import DecodeRunner
from tq.engines.source import ModelSource
from tq.tasks.exact_run import ExactReference
from tq.tasks.records import make_record
from tq.tasks.stats import PER_TOKEN_FIELDS, cluster_means, quality_summary
from tq.tasks.synthetic import Progress

PROTOCOLS = ("decode", "window")
# Windows decoded per engine call. Measured on SmolLM2-135M, 2 threads, 1k-token windows
# (benchmarks/perplexity_decode.py): decode throughput rises with the batch up to 16 sequences.
DEFAULT_BATCH = 16
TEXT = "Wikipedia excerpt of the gensim wheel (tq.data.corpus), windows drawn across its articles"
DEFAULT_SAMPLE_SEED = 0


def _check_shape(windows: int, window: int, context: int) -> None:
    if windows < 1:
        raise ValueError(f"windows must be at least 1, got {windows}")
    if not 2 <= context < window:
        raise ValueError(f"need 2 <= context < window, got context={context}, window={window}")


def reference_settings(
    runner: DecodeRunner, source: ModelSource, windows: int, window: int, context: int, sample_seed: int
) -> dict[str, Any]:
    """What a perplexity reference is made for (:meth:`ExactReference.require` checks it)."""
    return {
        "workload": "perplexity",
        "model": runner.name,
        **source.engine_settings(),
        "text": TEXT,
        "sample_seed": sample_seed,
        "windows": windows,
        "window": window,
        "context": context,
    }


def text_windows(
    files: Any,
    windows: int,
    window: int,
    sample_seed: int,
    cache: os.PathLike | None = None,
    corpus_file: os.PathLike | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``windows`` windows of ``window`` tokens drawn across the corpus's articles from
    ``sample_seed`` (:func:`tq.data.corpus.draw_windows`), encoded with the tokenizer of ``files`` (a
    runner's model files): int64 [windows, window], and each window's article, title and token
    offset. The corpus: ``corpus_file`` (a file of :func:`tq.data.corpus.write_corpus_files`), else
    the one cached under ``cache``."""
    from tq.data.corpus import draw_windows

    tokens, drawn = draw_windows(files.encode, windows, window, sample_seed, cache, corpus_file)
    described = [{"article": w.article, "title": w.title, "offset": w.offset} for w in drawn]
    return np.asarray(tokens, np.int64), described


def perplexity_reference(
    model: str | os.PathLike | ModelSource,
    windows: int = 4,
    window: int = 1024,
    context: int = 512,
    threads: int | None = None,
    cache: os.PathLike | None = None,
    sample_seed: int = DEFAULT_SAMPLE_SEED,
    corpus_file: os.PathLike | None = None,
) -> ExactReference:
    """The exact run on the perplexity windows: one call per window over tokens 0..window-2,
    whose logits at positions context-1.. predict the scored tokens (compact encoding). Equal to
    the exact decode loop within float rounding: attention is causal, so a position sees the same
    tokens either way. ``model``: the model and its engine (a path: an ONNX bundle). The
    reference's config lists the windows drawn (``text_windows``; ``corpus_file`` and ``cache``:
    where the corpus comes from, see there)."""
    _check_shape(windows, window, context)
    source = ModelSource.of(model)
    runner = source.open(threads)
    return _exact_reference(runner, source, windows, window, context, sample_seed, cache, corpus_file)


def _exact_reference(
    runner: DecodeRunner,
    source: ModelSource,
    windows: int,
    window: int,
    context: int,
    sample_seed: int,
    cache: os.PathLike | None,
    corpus_file: os.PathLike | None = None,
) -> ExactReference:
    tokens, drawn = text_windows(runner.files, windows, window, sample_seed, cache, corpus_file)
    progress = Progress("tq perplexity reference")

    def sequences() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for index, row in enumerate(tokens):
            logits, _ = runner.prefill(row[:-1])
            progress(f"window {index + 1}/{windows}")
            yield row, row[context:], logits[context - 1 :]

    settings = reference_settings(runner, source, windows, window, context, sample_seed)
    return ExactReference.from_sequences(sequences(), "compact", settings | {"text_windows": drawn})


def _layer_configs(
    num_layers: int,
    exact_first_layers: int,
    exact_last_layers: int,
    exact_layer_set: Sequence[int],
    quantized_layers: Sequence[int] | None,
) -> dict[int, CacheConfig]:
    """The per-layer exact overrides of a cache (see :func:`run_perplexity`)."""
    if quantized_layers is None:
        return exact_layers(num_layers, exact_first_layers, exact_last_layers, exact_layer_set)
    if exact_first_layers or exact_last_layers or len(exact_layer_set):
        raise ValueError("give quantized_layers or exact layers (first, last or a set), not both")
    outside = sorted(set(quantized_layers) - set(range(num_layers)))
    if outside or not quantized_layers:
        raise ValueError(
            f"quantized_layers must name layers of the model (0..{num_layers - 1}), "
            f"got {list(quantized_layers)}"
        )
    configs = exact_layers(num_layers, first=num_layers)
    for layer in quantized_layers:
        del configs[layer]
    return configs


def run_perplexity(
    model: str | os.PathLike | ModelSource,
    config: CacheConfig | None = None,
    exact_first_layers: int = 0,
    exact_last_layers: int = 0,
    exact_layer_set: Sequence[int] = (),
    windows: int = 4,
    window: int = 1024,
    context: int = 512,
    threads: int | None = None,
    cache: os.PathLike | None = None,
    protocol: str = "decode",
    quantized_layers: Sequence[int] | None = None,
    reference: ExactReference | str | os.PathLike | None = None,
    batch: int = DEFAULT_BATCH,
    sample_seed: int = DEFAULT_SAMPLE_SEED,
) -> dict[str, Any]:
    """Exact vs quantized perplexity over ``windows`` windows; return a ``perplexity`` record.

    Args:
        model: the model and its engine (a path: an ONNX bundle).
        reference: the exact run (:func:`perplexity_reference`, or a file it was saved to) for
            these windows; computed here when not given.
        sample_seed: the seed the windows are drawn from (:func:`text_windows`).
        batch: windows decoded per graph call (``decode`` protocol; 1 = one window at a time).
        quantized_layers: quantize only those layers and keep every other one exact (per-layer
            sensitivity); replaces ``exact_first_layers`` / ``exact_last_layers`` /
            ``exact_layer_set`` (any set of layers kept exact).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    _check_shape(windows, window, context)
    config = config or CacheConfig()
    source = ModelSource.of(model)
    runner = source.open(threads)
    layer_configs = _layer_configs(
        runner.files.num_layers, exact_first_layers, exact_last_layers, exact_layer_set, quantized_layers
    )
    start = time.perf_counter()
    if reference is None:
        reference = _exact_reference(runner, source, windows, window, context, sample_seed, cache)
        reference_source = "computed in this run"
    elif isinstance(reference, ExactReference):
        reference_source = "given"
    else:
        reference_source = os.fspath(reference)
        reference = ExactReference.load(reference)
    reference.require(**reference_settings(runner, source, windows, window, context, sample_seed))
    reference_seconds = time.perf_counter() - start
    tokens = np.stack([reference.sequence(index)[0] for index in range(windows)])
    progress = Progress("tq bench perplexity")
    per_token: list[dict[str, np.ndarray]] = []
    kv_nbytes = kv_float = 0
    start = time.perf_counter()
    for first in range(0, windows, batch if protocol == "decode" else 1):
        rows = tokens[first : first + batch] if protocol == "decode" else tokens[first : first + 1]
        caches = [runner.new_cache(config, layer_configs) for _ in rows]
        # The caches' size: the tokens they quantized (decode: every token; window: the
        # context, measured before the scoring call, which a transformers cache also takes in).
        if protocol == "decode":
            logits = runner.teacher_force(
                rows[:, :context],
                rows[:, context:],
                caches,
                on_step=lambda step, first=first, rows=rows, steps=window - context: (
                    step % 64 == 0
                    and progress(f"windows {first + 1}-{first + len(rows)}/{windows}: step {step}/{steps}")
                ),
            )
            sizes = [(kv.nbytes, kv.float_nbytes) for kv in caches]
        else:
            _, past = runner.prefill(rows[0, : context - 1], caches[0])
            sizes = [(caches[0].nbytes, caches[0].float_nbytes)]
            logits = runner.extend(rows[0, context - 1 : -1], past)[0][None]
        for offset, (nbytes, float_nbytes) in enumerate(sizes):
            per_token.append(reference.compare(first + offset, logits[offset]))
            kv_nbytes += nbytes
            kv_float += float_nbytes
        progress(f"windows {first + len(rows)}/{windows} done")
    seconds = time.perf_counter() - start
    values = {name: np.concatenate([part[name] for part in per_token]) for name in PER_TOKEN_FIELDS}
    window_of = np.concatenate([np.full(len(part["kl"]), index) for index, part in enumerate(per_token)])
    result = quality_summary(values, window_of) | {
        "context_kv_nbytes": kv_nbytes,
        "context_kv_float_nbytes": kv_float,
        "kv_compression_ratio": kv_float / kv_nbytes,
        "per_window": cluster_means(values, window_of),
        "per_token": {name: values[name].tolist() for name in PER_TOKEN_FIELDS}
        | {"window": window_of.tolist()},
    }
    record_config = {
        "workload": "perplexity",
        **source.describe(),
        "model": runner.name,
        "text": TEXT,
        "sample_seed": sample_seed,
        "windows": windows,
        "window": window,
        "context": context,
        "text_windows": reference.config["text_windows"],
        "se_unit": "window",
        "threads": threads,
        "cache": config.describe(),
        "exact_layers": sorted(layer_configs),
        "quantized_layers": None if quantized_layers is None else sorted(quantized_layers),
        "protocol": protocol,
        "batch": batch if protocol == "decode" else 1,
        "reference": reference_source,
    }
    timing = {
        "seconds": seconds,
        "scored_tokens_per_s": result["scored_tokens"] / seconds,
        "reference_seconds": reference_seconds,
    }
    return make_record("real-model", record_config, result, timing, threads or 0)

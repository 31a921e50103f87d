"""Perplexity on real text (the Wikipedia excerpt of :mod:`tq.corpus`), exact vs quantized cache.

Each window of ``window`` tokens is split into a context of ``context`` tokens and a scored
continuation of window - context tokens. Two protocols:

- ``window`` (default; two calls per window and cache): tokens 0..context-2 are prefilled in one
  call (their attention is exact) and their keys and values go into the cache, quantized or not;
  one more call feeds tokens context-1..window-2 against that cache and scores its logits on
  tokens context..window-1. Every scored prediction reads the context through the (quantized)
  cache, but the scored tokens attend to each other's exact keys and values (the graph computes
  them within the call), so this measures a quantized *context* only.
- ``decode`` (DESIGN.md section 10; window - context calls per window and cache): tokens
  0..context-1 are prefilled, then the continuation is decoded one token at a time with teacher
  forcing, every new token's keys and values quantized as they enter the cache: what a decoding
  server with a quantized cache would see.

Metrics: exact and quantized perplexity and their ratio, mean KL(exact || quantized) and top-1
agreement over the scored tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tq import metrics
from tq.bench.synthetic import Progress
from tq.kvcache import CacheConfig, exact_layers
from tq.records import make_record
from tq.runner import RealModelRunner

PROTOCOLS = ("window", "decode")
# Characters of text encoded per token needed, with a wide margin (English BPE: about 4-5).
_CHARS_PER_TOKEN = 8


def run_perplexity(
    bundle_dir: str | os.PathLike,
    config: CacheConfig | None = None,
    exact_first_layers: int = 0,
    exact_last_layers: int = 0,
    windows: int = 8,
    window: int = 1024,
    context: int = 512,
    threads: int | None = None,
    cache: os.PathLike | None = None,
    protocol: str = "window",
    quantized_layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Exact vs quantized perplexity over ``windows`` windows; return a ``real-model`` record.

    ``quantized_layers`` quantizes only those layers and keeps every other one exact (per-layer
    sensitivity); it replaces ``exact_first_layers`` / ``exact_last_layers``.
    """
    from tq.corpus import corpus_text, token_windows
    from tq.models.bundle import ModelBundle

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not 2 <= context < window:
        raise ValueError(f"need 2 <= context < window, got context={context}, window={window}")
    config = config or CacheConfig()
    bundle = ModelBundle.load(bundle_dir)
    runner = RealModelRunner(bundle, threads)
    layer_configs = exact_layers(bundle.num_layers, exact_first_layers, exact_last_layers)
    if quantized_layers is not None:
        if exact_first_layers or exact_last_layers:
            raise ValueError("give quantized_layers or exact_first_layers/exact_last_layers, not both")
        outside = sorted(set(quantized_layers) - set(range(bundle.num_layers)))
        if outside or not quantized_layers:
            raise ValueError(
                f"quantized_layers must name layers of the model (0..{bundle.num_layers - 1}), got "
                f"{list(quantized_layers)}"
            )
        layer_configs = exact_layers(bundle.num_layers, first=bundle.num_layers)
        for layer in quantized_layers:
            del layer_configs[layer]
    text = corpus_text(cache)
    ids = bundle.encode(text[: windows * window * _CHARS_PER_TOKEN])
    if len(ids) < windows * window:
        ids = bundle.encode(text)
    batches = token_windows(ids, window, windows)
    progress = Progress("tq bench perplexity")
    exact_nll, quantized_nll, kl, agree = [], [], [], []
    kv_nbytes = kv_float = 0
    start = time.perf_counter()
    for index, tokens in enumerate(batches):
        targets = tokens[context:]
        kv = runner.new_cache(config, layer_configs)
        if protocol == "window":
            _, presents = runner.prefill(tokens[: context - 1])
            exact_logits, _ = runner.extend(tokens[context - 1 : -1], presents)
            quantized_past = runner.quantize_presents(kv, presents, 0)
            quantized_logits, _ = runner.extend(tokens[context - 1 : -1], quantized_past)
        else:
            exact_logits = runner.generate(tokens[:context], 0, forced_tokens=targets).logits
            quantized_logits = runner.generate(tokens[:context], 0, cache=kv, forced_tokens=targets).logits
        kv_nbytes += kv.nbytes
        kv_float += kv.float_nbytes
        exact_nll.append(metrics.cross_entropy(exact_logits, targets))
        quantized_nll.append(metrics.cross_entropy(quantized_logits, targets))
        kl.append(metrics.kl_divergence(exact_logits, quantized_logits))
        agree.append(metrics.top1_agreement(exact_logits, quantized_logits))
        progress(
            f"window {index + 1}/{windows}: perplexity exact {np.exp(exact_nll[-1]):.2f}, "
            f"quantized {np.exp(quantized_nll[-1]):.2f}"
        )
    seconds = time.perf_counter() - start
    exact_ppl = metrics.perplexity(float(np.mean(exact_nll)))
    quantized_ppl = metrics.perplexity(float(np.mean(quantized_nll)))
    result = {
        "exact_perplexity": exact_ppl,
        "quantized_perplexity": quantized_ppl,
        "perplexity_ratio": quantized_ppl / exact_ppl,
        "kl_divergence": float(np.mean(kl)),
        "top1_agreement": float(np.mean(agree)),
        "scored_tokens": windows * (window - context),
        "context_kv_nbytes": kv_nbytes,
        "context_kv_float_nbytes": kv_float,
        "kv_compression_ratio": kv_float / kv_nbytes,
        "window_perplexities": {
            "exact": np.exp(exact_nll).tolist(),
            "quantized": np.exp(quantized_nll).tolist(),
        },
    }
    record_config = {
        "workload": "perplexity",
        "bundle": os.fspath(bundle_dir),
        "model": bundle.info.get("preset") or bundle.path.name,
        "text": "Wikipedia excerpt of the gensim wheel (tq.corpus)",
        "windows": windows,
        "window": window,
        "context": context,
        "threads": threads,
        "cache": config.describe(),
        "exact_layers": sorted(layer_configs),
        "quantized_layers": None if quantized_layers is None else sorted(quantized_layers),
        "protocol": protocol,
    }
    return make_record("real-model", record_config, result, {"seconds": seconds}, threads or 0)

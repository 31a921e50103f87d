"""The real-model workload: a decoder's own decode loop with exact and quantized KV caches.

Modes (the reference crate's ``--real-eval-mode``):

- ``exact``: greedy decoding with the float cache.
- ``quantized``: greedy decoding with a :class:`~tq.kvcache.MultiHeadKVCache`.
- ``compare``: both, per prompt. Teacher-forced: the quantized cache follows the exact run's
  tokens, so every step's logits are comparable (logit RMSE, top-k and top-1 agreement,
  KL(exact || quantized), cross-entropy and perplexity of the quantized run on the exact run's
  tokens: a drift measure, not a dataset perplexity). Free-running: the quantized run decodes on
  its own (token match rate, first divergence step; ``divergence_rate`` is the share of prompts
  whose free-running tokens differ from the exact run's anywhere).

Timing: prefill latency and decode tokens/s per mode (same threads). KV memory: bytes the cache
stores at the end vs fp32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tq import metrics
from tq.bench.synthetic import Progress
from tq.kvcache import CacheConfig, exact_layers
from tq.records import make_record
from tq.runner import Generation, RealModelRunner

MODES = ("exact", "quantized", "compare")
DEFAULT_TOP_K = 5


def _timing(runs: Sequence[Generation]) -> dict[str, float]:
    decode_steps = sum(len(run.tokens) - 1 for run in runs)
    decode_seconds = sum(run.decode_seconds for run in runs)
    return {
        "prefill_seconds_mean": float(np.mean([run.prefill_seconds for run in runs])),
        "decode_tokens_per_s": decode_steps / decode_seconds if decode_seconds > 0 else float("nan"),
        "generated_tokens": sum(len(run.tokens) for run in runs),
    }


def _memory(runs: Sequence[Generation]) -> dict[str, float]:
    stored = sum(run.kv_nbytes for run in runs)
    full = sum(run.kv_float_nbytes for run in runs)
    return {
        "kv_nbytes": stored,
        "kv_float_nbytes": full,
        "kv_compression_ratio": full / stored if stored else 1.0,
    }


def compare_metrics(
    exact: Sequence[Generation], forced: Sequence[Generation], free: Sequence[Generation], top_k: int
) -> dict[str, Any]:
    """Drift of teacher-forced and free-running quantized runs against the exact runs."""
    exact_logits = np.concatenate([run.logits for run in exact])
    forced_logits = np.concatenate([run.logits for run in forced])
    targets = np.concatenate([run.tokens for run in exact])
    nll = metrics.cross_entropy(forced_logits, targets)
    divergence = [metrics.first_divergence(e.tokens, f.tokens) for e, f in zip(exact, free, strict=True)]
    matched = sum(
        min(len(e.tokens), len(f.tokens)) * metrics.token_match_rate(e.tokens, f.tokens)
        for e, f in zip(exact, free, strict=True)
    )
    compared = sum(min(len(e.tokens), len(f.tokens)) for e, f in zip(exact, free, strict=True))
    return {
        "logit_rmse": metrics.logit_rmse(exact_logits, forced_logits),
        "topk_agreement": metrics.topk_agreement(exact_logits, forced_logits, top_k),
        "top1_agreement": metrics.top1_agreement(exact_logits, forced_logits),
        "kl_divergence": metrics.kl_divergence(exact_logits, forced_logits),
        "cross_entropy": nll,
        "perplexity": metrics.perplexity(nll),
        "exact_cross_entropy": metrics.cross_entropy(exact_logits, targets),
        "token_match_rate": matched / compared if compared else 1.0,
        "divergence_rate": float(np.mean([step is not None for step in divergence])),
        "first_divergence_steps": divergence,
        "teacher_forced_steps": len(targets),
    }


def run_real_model(
    bundle_dir: str | os.PathLike,
    prompts: Sequence[str],
    mode: str = "compare",
    config: CacheConfig | None = None,
    exact_first_layers: int = 0,
    exact_last_layers: int = 0,
    max_new_tokens: int = 16,
    top_k: int = DEFAULT_TOP_K,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run prompts through a bundle in one mode; return a ``real-model`` result record."""
    from tq.models.bundle import ModelBundle

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    config = config or CacheConfig()
    bundle = ModelBundle.load(bundle_dir)
    runner = RealModelRunner(bundle, threads)
    layer_configs = exact_layers(bundle.num_layers, exact_first_layers, exact_last_layers)
    progress = Progress(f"tq bench real-model {mode}")
    exact: list[Generation] = []
    forced: list[Generation] = []
    free: list[Generation] = []
    per_prompt = []
    for index, prompt in enumerate(prompts):
        ids = bundle.encode(prompt)
        row: dict[str, Any] = {"prompt_tokens": len(ids)}
        if mode in ("exact", "compare"):
            exact.append(runner.generate(ids, max_new_tokens))
            row["exact_text"] = bundle.decode(exact[-1].tokens)
        if mode == "compare":
            forced.append(runner.generate(ids, 0, runner.new_cache(config, layer_configs), exact[-1].tokens))
        if mode in ("quantized", "compare"):
            free.append(runner.generate(ids, max_new_tokens, runner.new_cache(config, layer_configs)))
            row["quantized_text"] = bundle.decode(free[-1].tokens)
        per_prompt.append(row)
        progress(f"prompt {index + 1}/{len(prompts)} done")
    result: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    if exact:
        timing["exact"] = _timing(exact)
        result["exact_kv"] = _memory(exact)
    if free:
        timing["quantized"] = _timing(free)
        result["quantized_kv"] = _memory(free)
    if mode == "compare":
        result.update(compare_metrics(exact, forced, free, top_k))
        result["decode_speed_ratio"] = (
            timing["quantized"]["decode_tokens_per_s"] / timing["exact"]["decode_tokens_per_s"]
        )
    result["per_prompt"] = per_prompt
    record_config = {
        "workload": "real-model",
        "bundle": os.fspath(bundle_dir),
        "model": bundle.info.get("preset") or bundle.path.name,
        "mode": mode,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "threads": threads,
        "cache": config.describe() if mode != "exact" else None,
        "exact_layers": sorted(layer_configs),
        "note": "ONNX Runtime computes float attention over the cache's reconstruction; the current "
        "call's own keys and values are exact and are quantized for later calls.",
    }
    return make_record("real-model", record_config, result, timing, threads or 0)

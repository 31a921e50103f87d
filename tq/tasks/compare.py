"""The real-model workload: a decoder's own decode loop with exact and quantized KV caches.

Modes (the reference crate's ``--real-eval-mode``):

- ``exact``: greedy decoding with the float cache.
- ``quantized``: greedy decoding with a :class:`~tq.cache.kvcache.MultiHeadKVCache`.
- ``compare``: both, per prompt. Teacher-forced: the quantized cache follows the exact run's
  tokens, so every step's logits are comparable (logit RMSE, top-k and top-1 agreement,
  KL(exact || quantized), cross-entropy and perplexity of the quantized run on the exact run's
  tokens: a drift measure, not a dataset perplexity). Free-running: the quantized run decodes on
  its own (token match rate, first divergence step; ``divergence_rate`` is the share of prompts
  whose free-running tokens differ from the exact run's anywhere).

Prompts (``prompt_format``): ``chat`` (the default) gives each prompt to a model with a chat
template as one user turn of its chat format, answered in the assistant turn (the same helper as
the needle task, :class:`tq.models.chat.PromptFormat`); a model without one gets the raw text,
and the record's ``prompt_format`` says which format was used. ``raw``: the text as it is. An
instruct model fed raw text often ends its answer at once (SmolLM2-135M-Instruct answers
``<|im_end|>`` first to most of the suite), which leaves compare mode almost nothing to score.

Scored tokens: compare mode scores each exact answer token (teacher-forced), so a prompt
contributes as many tokens as its exact answer has (``per_prompt``: ``exact_tokens`` and
``scored_tokens``); ``possible_tokens`` is prompts x max_new_tokens. An exact answer that ends at
its first token (EOS first) contributes one: ``prompts_ended_at_once`` counts them, and
``warnings`` says so when there are any, or when fewer than half the possible tokens are scored.

Compare mode scores the quantized runs against an :class:`~tq.tasks.exact_run.ExactReference` of the
exact runs (``reference``): the file the exact mode writes with ``reference_out`` (the pipeline's
``baseline`` job), or, without one, the exact runs made here. Every teacher-forced figure is a
mean over the forced tokens with its standard error (:mod:`tq.tasks.stats`).

Timing: prefill latency and decode tokens/s per mode (same threads). A speed that cannot be
computed (no decode step: every answer ended at its first token) is null, with the reason in
``<name>_reason``. KV memory: bytes the cache stores at the end vs fp32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tq.cache.config import CacheConfig, exact_layers
from tq.engines.base import Generation
from tq.engines.source import ModelSource
from tq.models.chat import PROMPT_FORMATS, PromptFormat
from tq.tasks.exact_run import ExactReference, ReferenceError
from tq.tasks.records import make_record
from tq.tasks.stats import PER_TOKEN_FIELDS, cluster_mean_se, quality_summary
from tq.tasks.synthetic import Progress

MODES = ("exact", "quantized", "compare")
DEFAULT_TOP_K = 5
_NO_DECODE_STEP = "no decode step: every answer ended at its first token (the prefill's)"
# A warning when the exact answers hold fewer than this share of prompts x max_new_tokens.
SCORED_SHARE_WARNING = 0.5


def _timing(runs: Sequence[Generation]) -> dict[str, Any]:
    decode_steps = sum(len(run.tokens) - 1 for run in runs)
    decode_seconds = sum(run.decode_seconds for run in runs)
    timing: dict[str, Any] = {
        "prefill_seconds_mean": float(np.mean([run.prefill_seconds for run in runs])),
        "decode_tokens_per_s": decode_steps / decode_seconds if decode_steps and decode_seconds > 0 else None,
        "generated_tokens": sum(len(run.tokens) for run in runs),
    }
    if timing["decode_tokens_per_s"] is None:
        timing["decode_tokens_per_s_reason"] = _NO_DECODE_STEP
    return timing


def speed_ratio(quantized: dict[str, Any], exact: dict[str, Any]) -> dict[str, Any]:
    """``decode_speed_ratio`` = quantized / exact decode tokens/s, or None with the reason."""
    for side, timing in (("quantized", quantized), ("exact", exact)):
        if timing.get("decode_tokens_per_s") is None:
            reason = timing.get("decode_tokens_per_s_reason", "no decode speed")
            return {"decode_speed_ratio": None, "decode_speed_ratio_reason": f"{side} run: {reason}"}
    return {"decode_speed_ratio": quantized["decode_tokens_per_s"] / exact["decode_tokens_per_s"]}


def _memory(runs: Sequence[Generation]) -> dict[str, float]:
    stored = sum(run.kv_nbytes for run in runs)
    full = sum(run.kv_float_nbytes for run in runs)
    return {
        "kv_nbytes": stored,
        "kv_float_nbytes": full,
        "kv_compression_ratio": full / stored if stored else 1.0,
    }


def reference_settings(
    model: str, max_new_tokens: int, source: ModelSource, prompt_format: str
) -> dict[str, Any]:
    """What a prompt-suite reference is made for (:meth:`ExactReference.require` checks it);
    ``prompt_format`` is the format used ("chat" or "raw")."""
    return {
        "workload": "real-model",
        "model": model,
        "max_new_tokens": max_new_tokens,
        "prompt_format": prompt_format,
        **source.engine_settings(),
    }


def answer_lengths(
    exact_tokens: Sequence[Sequence[int]], max_new_tokens: int, eos_token_ids: Sequence[int]
) -> dict[str, Any]:
    """How many tokens the exact answers hold, against prompts x max_new_tokens, with warnings
    (a list of sentences, empty if none) when answers end at once or few tokens are left."""
    lengths = [len(tokens) for tokens in exact_tokens]
    ended = sum(1 for tokens in exact_tokens if len(tokens) == 1 and tokens[0] in eos_token_ids)
    possible = len(lengths) * max_new_tokens
    scored = sum(lengths)
    warnings = []
    if ended:
        warnings.append(
            f"{ended} of {len(lengths)} exact answers end at once (the first token is the end of "
            "the sequence): each contributes one scored token"
        )
    if scored < SCORED_SHARE_WARNING * possible:
        warnings.append(
            f"the exact answers hold {scored} of {possible} possible tokens (prompts x "
            f"max_new_tokens): the comparison rests on few tokens"
        )
    return {
        "exact_answer_tokens": scored,
        "possible_tokens": possible,
        "prompts_ended_at_once": ended,
        "warnings": warnings,
    }


def prompt_reference(
    prompt_ids: Sequence[Sequence[int]], exact: Sequence[Generation], settings: dict[str, Any]
) -> ExactReference:
    """The exact runs of the prompts as a reference (float32 logits: the logit RMSE needs them)."""
    runs = ((ids, run.tokens, run.logits) for ids, run in zip(prompt_ids, exact, strict=True))
    return ExactReference.from_sequences(runs, "float32", settings)


def compare_metrics(
    reference: ExactReference, forced: Sequence[Generation], free: Sequence[Generation], top_k: int
) -> dict[str, Any]:
    """Drift of teacher-forced and free-running quantized runs against the exact runs.

    ``forced[i]`` follows the exact tokens of the reference's sequence i; ``free[i]`` decodes on
    its own. Teacher-forced figures have standard errors with the prompt as the unit (and per
    forced token as ``<name>_se_token``; :mod:`tq.tasks.stats`).
    """
    from tq.tasks import metrics

    parts = [reference.compare(index, run.logits) for index, run in enumerate(forced)]
    values = {name: np.concatenate([part[name] for part in parts]) for name in PER_TOKEN_FIELDS}
    prompts = np.concatenate([np.full(len(part["kl"]), index) for index, part in enumerate(parts)])
    exact_logits = np.concatenate([reference.logits(reference.rows(i)) for i in range(len(forced))])
    forced_logits = np.concatenate([run.logits for run in forced])
    squared = np.mean((exact_logits.astype(np.float64) - forced_logits) ** 2, axis=1)
    mean_squared, mean_squared_se = cluster_mean_se(squared, prompts)
    rmse = float(np.sqrt(mean_squared))
    exact_tokens = [reference.sequence(i)[1].tolist() for i in range(len(free))]
    divergence = [metrics.first_divergence(e, f.tokens) for e, f in zip(exact_tokens, free, strict=True)]
    compared = [min(len(e), len(f.tokens)) for e, f in zip(exact_tokens, free, strict=True)]
    matched = sum(
        n * metrics.token_match_rate(e, f.tokens)
        for n, e, f in zip(compared, exact_tokens, free, strict=True)
    )
    summary = quality_summary(values, prompts)
    return summary | {
        "logit_rmse": rmse,
        "logit_rmse_se": None if mean_squared_se is None or rmse == 0 else mean_squared_se / (2 * rmse),
        "topk_agreement": metrics.topk_agreement(exact_logits, forced_logits, top_k),
        "cross_entropy": float(values["quantized_nll"].mean()),
        "perplexity": summary["quantized_perplexity"],
        "exact_cross_entropy": float(values["exact_nll"].mean()),
        "token_match_rate": matched / sum(compared) if sum(compared) else 1.0,
        "divergence_rate": float(np.mean([step is not None for step in divergence])) if divergence else 0.0,
        "first_divergence_steps": divergence,
        "teacher_forced_steps": summary["scored_tokens"],
    }


def _load_reference(
    reference: ExactReference | str | os.PathLike,
    prompt_ids: Sequence[Sequence[int]],
    settings: dict[str, Any],
) -> ExactReference:
    if not isinstance(reference, ExactReference):
        reference = ExactReference.load(reference)
    reference.require(**settings)
    if reference.sequences != len(prompt_ids):
        raise ReferenceError(
            f"the exact reference holds {reference.sequences} prompts, this job {len(prompt_ids)}"
        )
    for index, ids in enumerate(prompt_ids):
        if reference.sequence(index)[0].tolist() != list(ids):
            raise ReferenceError(f"prompt {index} is not the one the exact reference was made from")
    return reference


def run_real_model(
    model: str | os.PathLike | ModelSource,
    prompts: Sequence[str],
    mode: str = "compare",
    config: CacheConfig | None = None,
    exact_first_layers: int = 0,
    exact_last_layers: int = 0,
    exact_layer_set: Sequence[int] = (),
    max_new_tokens: int = 16,
    top_k: int = DEFAULT_TOP_K,
    threads: int | None = None,
    reference: ExactReference | str | os.PathLike | None = None,
    reference_out: str | os.PathLike | None = None,
    prompt_format: str = "chat",
) -> dict[str, Any]:
    """Run prompts through a model in one mode; return a ``real-model`` result record.

    Args:
        model: the model and its engine (a path: an ONNX bundle).
        exact_first_layers, exact_last_layers, exact_layer_set: layers kept exact (the first
            and last counts, and any set of layer indices).
        prompt_format: "chat": each prompt as one user turn of the model's chat format (raw
            text for a model without a chat template; the record's ``prompt_format`` is the
            format used); "raw": the text as it is.
        reference: compare mode: the exact runs (a reference written by the exact mode with
            ``reference_out``, or its file) instead of running them again; the record's exact
            timing is then the one stored with the reference.
        reference_out: exact mode: also write the exact runs there as a reference.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if reference is not None and mode != "compare":
        raise ValueError("a reference is read in compare mode only")
    if reference_out is not None and mode != "exact":
        raise ValueError("a reference is written in exact mode only")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    config = config or CacheConfig()
    source = ModelSource.of(model)
    runner = source.open(threads)
    files = runner.files
    formatter = PromptFormat(files, prompt_format)
    settings = reference_settings(runner.name, max_new_tokens, source, formatter.format)
    layer_configs = exact_layers(files.num_layers, exact_first_layers, exact_last_layers, exact_layer_set)
    prompt_ids = formatter.encode_all(prompts)
    if reference is not None:
        reference = _load_reference(reference, prompt_ids, settings)
    run_exact = mode == "exact" or (mode == "compare" and reference is None)
    progress = Progress(f"tq bench real-model {mode}")
    exact: list[Generation] = []
    forced: list[Generation] = []
    free: list[Generation] = []
    per_prompt = []
    answers: list[list[int]] = []
    for index, ids in enumerate(prompt_ids):
        row: dict[str, Any] = {"prompt_tokens": len(ids)}
        if run_exact:
            exact.append(runner.generate(ids, max_new_tokens))
            exact_tokens = exact[-1].tokens
        elif mode == "compare":
            exact_tokens = reference.sequence(index)[1].tolist()
        if mode != "quantized":
            row["exact_text"] = files.decode(exact_tokens)
            row["exact_tokens"] = len(exact_tokens)
            answers.append(exact_tokens)
        if mode == "compare":
            forced.append(runner.generate(ids, 0, runner.new_cache(config, layer_configs), exact_tokens))
            row["scored_tokens"] = len(forced[-1].logits)
        if mode in ("quantized", "compare"):
            free.append(runner.generate(ids, max_new_tokens, runner.new_cache(config, layer_configs)))
            row["quantized_text"] = files.decode(free[-1].tokens)
        per_prompt.append(row)
        progress(f"prompt {index + 1}/{len(prompts)} done")
    result: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    if exact:
        timing["exact"] = _timing(exact)
        result["exact_kv"] = _memory(exact)
    if reference_out is not None:
        prompt_reference(prompt_ids, exact, settings | {"timing": timing["exact"]}).save(reference_out)
    if free:
        timing["quantized"] = _timing(free)
        result["quantized_kv"] = _memory(free)
    if mode == "compare":
        if reference is None:
            reference = prompt_reference(prompt_ids, exact, settings)
        else:
            timing["exact"] = reference.config.get("timing", {})
        result.update(compare_metrics(reference, forced, free, top_k))
        result.update(speed_ratio(timing["quantized"], timing["exact"]))
    if answers:
        result.update(answer_lengths(answers, max_new_tokens, files.eos_token_ids))
    result["per_prompt"] = per_prompt
    record_config = {
        "workload": "real-model",
        **source.describe(),
        "model": runner.name,
        "mode": mode,
        "prompts": len(prompts),
        "prompt_format": formatter.format,
        "prompt_format_requested": prompt_format,
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "threads": threads,
        "cache": config.describe() if mode != "exact" else None,
        "exact_layers": sorted(layer_configs),
        "exact_runs": "read from the reference" if mode == "compare" and not exact else "run here",
        "se_unit": "prompt" if mode == "compare" else None,
        "note": f"{source.engine} computes float attention over the cache's reconstruction; the "
        "current call's own keys and values are exact and are quantized for later calls.",
    }
    return make_record("real-model", record_config, result, timing, threads or 0)

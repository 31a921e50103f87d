"""Extract per-head KV traces (:class:`tq.data.trace.KvTrace`) from a Hugging Face model directory.

How each part of a trace is captured (torch and transformers are imported inside the functions,
so ``import tq`` never needs them):

- Keys and values are taken from the model's own KV cache after a forward pass with
  ``use_cache=True``: ``past_key_values`` layer L, KV head H, which is exactly what a cache holds
  (after RoPE for RoPE models; with grouped-query attention the KV heads are not repeated).
- Queries are captured where the attention kernel receives them: the model is loaded with an
  attention implementation registered through transformers' ``AttentionInterface`` that records
  the query states it is given and then runs the stock SDPA attention (with the stock SDPA mask).
  Those query states are after every projection, norm and rotary embedding the model applies, for
  any model family that uses the attention interface (Llama-family, GPT-2, ...), with no
  monkeypatching and no per-family code. If the model's attention scale is not
  1/sqrt(head_dim), the queries are multiplied by scale * sqrt(head_dim), so that in every trace
  the attention logit is ``q . k / sqrt(head_dim)``; the note says so.
- Grouped-query attention: KV head h is shared by query heads h*g .. (h+1)*g - 1 (g = query
  heads / KV heads); the trace stores the queries of the group's first query head, h*g.
- Queries are taken at the last ``queries_per_sample`` positions of each prompt.
- Ragged prompts: every prompt is cut to the same number of tokens, ``seq`` = the token count of
  the shortest prompt, or ``max_seq`` if that is smaller. Tokens past ``seq`` are dropped (never
  padded), so each prompt runs alone, unpadded, and the arrays stay rectangular.

Attention that ``q . k / sqrt(head_dim)`` cannot describe is refused: logit soft-capping, and a
sliding window shorter than ``seq``.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tq.data.trace import KvTrace

DEFAULT_QUERIES_PER_SAMPLE = 16
# With at least this many prompts, a progress line goes to stderr per prompt.
PROGRESS_MIN_PROMPTS = 10
PROMPT_SUFFIXES = (".txt", ".jsonl")

_CAPTURE_ATTENTION = "tq_trace_capture"


class TraceExportError(ValueError):
    """Bad input to a trace export: prompts, model directory, indices or lengths."""


def trace_filename(layer: int, head: int) -> str:
    """File name of the trace of one (layer, KV head): ``layer{L:02d}-head{H:02d}.safetensors``."""
    return f"layer{layer:02d}-head{head:02d}.safetensors"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read prompts: ``.txt`` has one prompt per non-empty line; ``.jsonl`` has one JSON object
    per non-empty line, with the prompt in its ``prompt`` field (a non-empty string).

    Leading and trailing whitespace of each prompt is stripped.

    Raises:
        TraceExportError: the file is missing or unreadable, has an unknown extension, holds
            no prompt, or a ``.jsonl`` line is not an object with a ``prompt`` string.
    """
    path = Path(path)
    if path.suffix not in PROMPT_SUFFIXES:
        raise TraceExportError(
            f"{path}: unknown prompt file extension {path.suffix!r} (expected one of {PROMPT_SUFFIXES})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceExportError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TraceExportError(f"{path}: cannot read the prompt file ({error})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TraceExportError(f"{path}:{number}: not valid JSON ({error})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise TraceExportError(f"{path}:{number}: no 'prompt' field with a non-empty string")
        prompts.append(prompt.strip())
    if not prompts:
        raise TraceExportError(f"{path}: no prompts (the file is empty)")
    return prompts


class _QueryCapture:
    """Records, per forward pass, the queries of the chosen query heads at the chosen positions.

    ``heads[layer]`` lists the query heads to keep; ``captured[layer]`` is float32
    [len(heads[layer]), len(positions), head_dim] after a forward pass, with the model's attention
    scale folded in (see the module docstring) and ``factors[layer]`` the factor used.
    """

    def __init__(self, heads: dict[int, list[int]], positions: list[int], seq: int) -> None:
        self.heads = heads
        self.positions = positions
        self.seq = seq
        self.captured: dict[int, np.ndarray] = {}
        self.factors: dict[int, float] = {}

    def record(self, module: Any, query: Any, kwargs: dict[str, Any]) -> None:
        layer = module.layer_idx
        if layer not in self.heads:
            return
        if kwargs.get("softcap") is not None:
            raise TraceExportError(
                f"layer {layer} soft-caps its attention logits; a trace cannot describe that attention"
            )
        window = kwargs.get("sliding_window")
        if window is not None and window <= self.seq:
            # A sliding-window cache keeps only the last window - 1 tokens.
            raise TraceExportError(
                f"layer {layer} has a sliding window of {window} tokens, not longer than seq {self.seq}: "
                f"use --max-seq {window - 1} or less"
            )
        head_dim = query.shape[-1]
        scaling = kwargs.get("scaling")
        factor = 1.0 if scaling is None else float(scaling) * math.sqrt(head_dim)
        if math.isclose(factor, 1.0, rel_tol=1e-9):  # head_dim**-0.5 * sqrt(head_dim), rounded
            factor = 1.0
        selected = query[0, self.heads[layer]][:, self.positions].float() * factor
        self.captured[layer] = selected.cpu().numpy()
        self.factors[layer] = factor


_capture: contextvars.ContextVar[_QueryCapture | None] = contextvars.ContextVar("tq_capture", default=None)


def _capturing_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
    """An ``AttentionInterface`` function: record the queries, then run SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = _capture.get()
    if capture is not None:
        capture.record(module, query.detach(), kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CAPTURE_ATTENTION, _capturing_attention)
    AttentionMaskInterface.register(_CAPTURE_ATTENTION, sdpa_mask)


def _indices(what: str, requested: Sequence[int], count: int) -> list[int]:
    """Sorted unique indices, each checked against [0, count)."""
    if not requested:
        raise TraceExportError(f"no {what}s given")
    for index in requested:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
            raise TraceExportError(
                f"{what} {index!r} out of range: the model has {count} {what}s, 0..{count - 1}"
            )
    return sorted({int(index) for index in requested})


def _load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    if not model_dir.is_dir():
        raise TraceExportError(f"{model_dir}: model directory not found")
    try:
        return AutoConfig.from_pretrained(model_dir).get_text_config()
    except (OSError, ValueError) as error:
        raise TraceExportError(f"{model_dir}: cannot read the model config ({error})") from None


def _tokenize(model_dir: Path, prompts: Sequence[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise TraceExportError(f"{model_dir}: cannot load the tokenizer ({error})") from None
    token_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    for number, ids in enumerate(token_ids):
        if not ids:
            raise TraceExportError(f"prompt {number} has no tokens")
    return token_ids


def _common_length(token_ids: list[list[int]], max_seq: int | None, max_positions: int | None) -> int:
    lengths = [len(ids) for ids in token_ids]
    seq = min(lengths)
    if max_seq is not None:
        if max_seq < 1:
            raise TraceExportError(f"max_seq must be >= 1, got {max_seq}")
        seq = min(seq, max_seq)
    if max_positions is not None and seq > max_positions:
        raise TraceExportError(
            f"seq {seq} exceeds the model's {max_positions} positions: use --max-seq {max_positions} or less"
        )
    return seq


def export_traces(
    model_dir: str | os.PathLike,
    prompts: Sequence[str],
    layers: Sequence[int],
    heads: Sequence[int],
    out_dir: str | os.PathLike,
    max_seq: int | None = None,
    queries_per_sample: int = DEFAULT_QUERIES_PER_SAMPLE,
    model_name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[Path]:
    """Run ``prompts`` through the model in ``model_dir`` and write one :class:`KvTrace` file per
    (layer, KV head) into ``out_dir``, named by :func:`trace_filename`.

    Args:
        model_dir: a Hugging Face model directory (config, weights, tokenizer) for a causal LM.
        prompts: the prompts; each becomes one sample of every trace.
        layers: decoder layers (0-based; duplicates ignored).
        heads: KV heads (0-based, among the key/value heads; duplicates ignored).
        out_dir: where the trace files go (created if needed; files are written atomically).
        max_seq: an upper bound on the tokens per sample. Every prompt is truncated to
            ``seq = min(shortest prompt's token count, max_seq)`` tokens.
        queries_per_sample: queries per sample, at the last positions seq - n .. seq - 1.
        model_name: the trace's ``model`` metadata; default: the directory's name.
        device, dtype: where and in which type the model runs (``cpu`` / ``cuda``; ``float32``,
            ``bfloat16``, ``float16``); the trace stores float32 either way.

    Returns:
        The written paths, layer by layer, heads in increasing order within a layer.
        Each trace holds keys and values float32 [len(prompts), seq, head_dim] and queries
        float32 [len(prompts), queries_per_sample, head_dim].

    Raises:
        TraceExportError: no prompts, a layer or head out of range (the message names the valid
            range), bad lengths, an unreadable model directory, or attention a trace cannot describe.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not prompts:
        raise TraceExportError("no prompts")
    config = _load_config(model_dir)
    n_query_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_query_heads
    layers = _indices("layer", layers, config.num_hidden_layers)
    heads = _indices("KV head", heads, n_kv_heads)
    group = n_query_heads // n_kv_heads
    token_ids = _tokenize(model_dir, prompts)
    seq = _common_length(token_ids, max_seq, getattr(config, "max_position_embeddings", None))
    if not 1 <= queries_per_sample <= seq:
        raise TraceExportError(f"queries_per_sample must be in [1, seq = {seq}], got {queries_per_sample}")
    positions = list(range(seq - queries_per_sample, seq))

    _register_capture()
    from tq.engines.torch_device import check_device, torch_dtype, torch_setting_problem

    problem = torch_setting_problem(device, dtype)
    if problem is not None:
        raise TraceExportError(problem)
    check_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation=_CAPTURE_ATTENTION, dtype=torch_dtype(dtype)
    )
    model.to(device).eval()
    uses_rope = any("RotaryEmbedding" in type(module).__name__ for module in model.modules())
    capture = _QueryCapture({layer: [h * group for h in heads] for layer in layers}, positions, seq)

    keys: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    values: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    queries: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    show_progress = len(prompts) >= PROGRESS_MIN_PROMPTS
    print(
        f"tq trace: {len(prompts)} prompts x {seq} tokens, layers {layers}, KV heads {heads}",
        file=sys.stderr,
        flush=True,
    )
    token = _capture.set(capture)
    try:
        for number, ids in enumerate(token_ids):
            if show_progress:
                print(f"tq trace: prompt {number + 1}/{len(prompts)}", file=sys.stderr, flush=True)
            with torch.inference_mode():
                cache = model(torch.tensor([ids[:seq]], device=device), use_cache=True).past_key_values
            for layer in layers:
                if layer not in capture.captured:
                    raise TraceExportError(
                        f"layer {layer}'s attention did not go through transformers' AttentionInterface, "
                        "so its queries cannot be captured"
                    )
                queries[layer].append(capture.captured.pop(layer))
                # [batch = 1, kv_heads, seq, head_dim] -> [len(heads), seq, head_dim]
                layer_cache = cache.layers[layer]
                if layer_cache.keys.shape[-2] != seq:
                    raise TraceExportError(
                        f"layer {layer}'s cache holds {layer_cache.keys.shape[-2]} of the {seq} tokens"
                    )
                keys[layer].append(layer_cache.keys[0, heads].float().cpu().numpy())
                values[layer].append(layer_cache.values[0, heads].float().cpu().numpy())
    finally:
        _capture.reset(token)

    truncation = f"shortest prompt {min(len(ids) for ids in token_ids)} tokens"
    if max_seq is not None:
        truncation += f", max_seq {max_seq}"
    out_dir = Path(out_dir)
    name = model_name if model_name is not None else model_dir.resolve().name
    paths = []
    for layer in layers:
        layer_keys, layer_values, layer_queries = (
            np.stack(arrays, axis=1) for arrays in (keys[layer], values[layer], queries[layer])
        )
        for index, head in enumerate(heads):
            note = (
                f"{len(prompts)} prompts truncated to seq {seq} tokens ({truncation}); queries of "
                f"query head {head * group} (first of the {group} query heads sharing KV head {head}) "
                f"at the last {queries_per_sample} positions"
            )
            factor = capture.factors[layer]
            if factor != 1.0:
                note += f"; queries scaled by {factor:.9g} so that logits are q.k/sqrt(head_dim)"
            trace = KvTrace(
                keys=np.ascontiguousarray(layer_keys[index]),
                values=np.ascontiguousarray(layer_values[index]),
                queries=np.ascontiguousarray(layer_queries[index]),
                query_positions=np.tile(np.array(positions, dtype=np.int64), (len(prompts), 1)),
                model=name,
                layer=layer,
                head=head,
                rope="post" if uses_rope else "none",
                note=note,
            )
            path = out_dir / trace_filename(layer, head)
            trace.save(path)
            paths.append(path)
    return paths

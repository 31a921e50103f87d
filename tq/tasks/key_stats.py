"""Per-layer statistics of a model's cached keys and values: how much of their energy is an offset
shared by every token, and how uneven their channels are.

Why: TurboQuant rotates each key and quantizes its direction with a codebook solved for the
coordinates of a random unit vector, storing the norm apart. That works when keys point in all
directions; it fails when nearly all of every key is one offset vector shared by all tokens (as in
the layers of Qwen2.5 whose key projection has a large bias, carried through RoPE's lowest
frequencies): the part that tells tokens apart is then a small residual the codebook cannot
resolve. The statistics here measure exactly that, per KV head and per layer.

For one layer's keys (or values) ``x``, float [kv_heads, tokens, head_dim] (every token of every
window of a head along the tokens axis; :func:`key_statistics`), per KV head h:

- ``mean_energy_share`` = tokens * ||mean_t x[h, t]||^2 / sum_t ||x[h, t]||^2: the share of the
  energy (sum of squared entries) in the head's mean vector, in [0, 1]. Near 1: every vector is
  about the same offset; near 0: the vectors are centered on the origin. (1 - share is the share
  of the energy left after subtracting the per-head mean.)
- ``channel_rms_ratio`` = max_c rms_c / median_c rms_c, with rms_c = sqrt(mean_t x[h, t, c]^2)
  (not centered): 1 for channels of equal scale; large when a few channels dominate.
- ``mean_norm``: the mean over tokens of ||x[h, t]|| (the model's units).
- ``max_channel``: the channel with the largest RMS (0-based within the head; in the rotate-half
  RoPE layout of Llama-family models channels d/2 - 1 and d - 1 carry the lowest frequency).

Pooled over heads (the layer's entry): the share is the heads' mean-vector energy over their total
energy (sum over h of the numerators over sum over h of the denominators), the RMS ratio is taken
over all kv_heads * head_dim channels, and the mean norm over all heads and tokens.

:func:`model_key_statistics` runs a Hugging Face checkpoint on windows drawn across the corpus's
articles (:func:`tq.data.corpus.draw_windows`, the same kind of text as the perplexity windows) and
reads every layer's keys and values from its KV cache (``past_key_values`` after a forward pass
with ``use_cache=True``: after RoPE for RoPE models, grouped-query KV heads not repeated; as
:mod:`tq.tasks.trace_export` does). torch and transformers are imported inside the functions, so
``import tq`` never needs them.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tq.tasks.trace_export import _load_config

SCHEMA = "tq.key_stats/1"
TEXT = "Wikipedia excerpt of the gensim wheel (tq.data.corpus), windows drawn across its articles"
DEFAULT_WINDOWS = 4
DEFAULT_WINDOW = 512
DEFAULT_SAMPLE_SEED = 0


class KeyStatsError(ValueError):
    """Bad input to the key statistics: an array of the wrong shape or with non-finite entries,
    bad token ids, or a model whose cache does not hold every token."""


def _share(offset_energy: float, energy: float) -> float | None:
    # Mathematically in [0, 1] (Cauchy-Schwarz); clipped against rounding in the last bit.
    return float(min(max(offset_energy / energy, 0.0), 1.0)) if energy > 0 else None


def _ratio(largest: float, median: float) -> float | None:
    return float(largest / median) if median > 0 else None


def _token_array(token_ids: Any) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or 0 in ids.shape or not np.issubdtype(ids.dtype, np.integer):
        raise KeyStatsError(f"token_ids must be int [windows, tokens], got {ids.dtype} {ids.shape}")
    return ids


def key_statistics(keys: np.ndarray) -> dict[str, Any]:
    """Offset share, channel imbalance and norm of one layer's keys (or values), per KV head and
    pooled over heads (see the module docstring for the definitions).

    Args:
        keys: float [kv_heads, tokens, head_dim]: every cached vector of each KV head, the
            tokens of all windows concatenated along axis 1 (the statistics treat them as one
            set). Computed in float64 whatever the input dtype.

    Returns:
        ``{"mean_energy_share", "channel_rms_ratio", "mean_norm", "heads", "tokens",
        "head_dim", "per_head": [{"head", "mean_energy_share", "channel_rms_ratio",
        "mean_norm", "max_channel"}, ...]}``: plain Python floats and ints. A share is None when
        the vectors are all zero, a ratio None when the median channel RMS is zero.

    Raises:
        KeyStatsError: ``keys`` is not 3-D, has an empty axis, is not a real number array, or
            holds NaN or infinity.
    """
    array = np.asarray(keys)
    if array.ndim != 3:
        raise KeyStatsError(f"keys must be [kv_heads, tokens, head_dim], got shape {array.shape}")
    if 0 in array.shape:
        raise KeyStatsError(f"keys must not be empty, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise KeyStatsError(f"keys must be real numbers, got dtype {array.dtype}")
    x = array.astype(np.float64)
    if not np.isfinite(x).all():
        raise KeyStatsError("keys hold NaN or infinity")
    heads, tokens, head_dim = x.shape
    mean = x.mean(axis=1)  # [heads, head_dim]
    offset_energy = tokens * np.sum(mean**2, axis=1)  # [heads]
    energy = np.sum(x**2, axis=(1, 2))  # [heads]
    rms = np.sqrt(np.mean(x**2, axis=1))  # [heads, head_dim]
    norms = np.linalg.norm(x, axis=2)  # [heads, tokens]
    per_head = [
        {
            "head": h,
            "mean_energy_share": _share(offset_energy[h], energy[h]),
            "channel_rms_ratio": _ratio(rms[h].max(), np.median(rms[h])),
            "mean_norm": float(norms[h].mean()),
            "max_channel": int(np.argmax(rms[h])),
        }
        for h in range(heads)
    ]
    return {
        "mean_energy_share": _share(offset_energy.sum(), energy.sum()),
        "channel_rms_ratio": _ratio(rms.max(), np.median(rms)),
        "mean_norm": float(norms.mean()),
        "heads": heads,
        "tokens": tokens,
        "head_dim": head_dim,
        "per_head": per_head,
    }


def layer_statistics(keys: np.ndarray, values: np.ndarray, layer: int) -> dict[str, Any]:
    """One layer's entry of :func:`model_key_statistics`: ``{"layer", "key", "value"}`` with
    :func:`key_statistics` of the keys and of the values (each float [kv_heads, tokens,
    head_dim])."""
    return {"layer": layer, "key": key_statistics(keys), "value": key_statistics(values)}


def cached_keys_values(
    model_dir: str | os.PathLike, token_ids: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every layer's cached keys and values of the model in ``model_dir`` on ``token_ids``.

    The model runs float32 on the CPU, each window alone (``use_cache=True``, no padding); the
    keys and values are read from ``past_key_values``, which is what a KV cache holds.

    Args:
        model_dir: a Hugging Face checkpoint directory of a causal LM (read with
            ``local_files_only``).
        token_ids: int [windows, tokens], each row one window.

    Returns:
        Per layer, (keys, values), each float32 [kv_heads, windows * tokens, head_dim]: window
        0's tokens first, then window 1's, and so on.

    Raises:
        KeyStatsError: bad token ids (not 2-D, empty, outside the vocabulary), windows longer
            than the model's positions, or a cache holding fewer tokens than a window (a sliding
            window layer).
        tq.tasks.trace_export.TraceExportError: the directory is missing or its config unreadable.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = _load_config(model_dir)
    ids = _token_array(token_ids)
    vocab = getattr(config, "vocab_size", None)
    if ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
        raise KeyStatsError(f"token ids must be in [0, {vocab}), got {ids.min()}..{ids.max()}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and ids.shape[1] > positions:
        raise KeyStatsError(f"windows of {ids.shape[1]} tokens exceed the model's {positions} positions")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    keys: list[list[np.ndarray]] = []
    values: list[list[np.ndarray]] = []
    for number, row in enumerate(ids):
        print(f"tq key stats: window {number + 1}/{len(ids)}", file=sys.stderr, flush=True)
        with torch.inference_mode():
            cache = model(torch.tensor(row[None], dtype=torch.long), use_cache=True).past_key_values
        if not keys:
            keys = [[] for _ in cache.layers]
            values = [[] for _ in cache.layers]
        for layer, layer_cache in enumerate(cache.layers):
            # [batch = 1, kv_heads, tokens, head_dim] -> [kv_heads, tokens, head_dim]
            if layer_cache.keys.shape[-2] != ids.shape[1]:
                raise KeyStatsError(
                    f"layer {layer}'s cache holds {layer_cache.keys.shape[-2]} of the {ids.shape[1]} tokens"
                )
            keys[layer].append(layer_cache.keys[0].float().numpy())
            values[layer].append(layer_cache.values[0].float().numpy())
    return [(np.concatenate(k, axis=1), np.concatenate(v, axis=1)) for k, v in zip(keys, values, strict=True)]


def model_key_statistics(
    model_dir: str | os.PathLike,
    windows: int = DEFAULT_WINDOWS,
    window: int = DEFAULT_WINDOW,
    sample_seed: int = DEFAULT_SAMPLE_SEED,
    *,
    model_name: str | None = None,
    cache: str | os.PathLike | None = None,
    corpus_file: str | os.PathLike | None = None,
    token_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Key and value statistics (:func:`key_statistics`) of every layer of the model in
    ``model_dir``, on ``windows`` windows of ``window`` tokens of the corpus.

    The windows are :func:`tq.data.corpus.draw_windows` ``(encode, windows, window, sample_seed,
    cache, corpus_file)`` with the checkpoint's tokenizer (``tokenizer.json``,
    :class:`tq.models.checkpoint.Checkpoint`), as the perplexity windows are drawn; each window
    runs alone (:func:`cached_keys_values`), and each head's statistics pool the tokens of all
    windows.

    Args:
        model_dir: a Hugging Face checkpoint directory (config, weights, ``tokenizer.json``).
        windows, window, sample_seed: how many windows, of how many tokens, from which seed.
        model_name: the record's ``model`` (default: the directory's name).
        cache: the corpus cache root (None: ``$TQ_CACHE_DIR``, see :mod:`tq.data.corpus`).
        corpus_file: a corpus file (:func:`tq.data.corpus.write_corpus_files`) to draw from
            instead of the cached corpus.
        token_ids: int [windows, tokens] to run instead of drawing corpus windows (then
            ``windows``, ``window`` and ``sample_seed`` are ignored and the record's
            ``text_windows`` is None).

    Returns:
        A JSON-able record::

            {"schema": "tq.key_stats/1", "model": name, "text": what the windows are,
             "sample_seed": int or None, "windows": int, "window": tokens per window,
             "text_windows": [{"article", "title", "offset"}, ...] or None,
             "num_layers": int,
             "layers": [{"layer": 0,
                         "key": {"mean_energy_share", "channel_rms_ratio", "mean_norm",
                                 "heads", "tokens", "head_dim",
                                 "per_head": [{"head", "mean_energy_share", "channel_rms_ratio",
                                               "mean_norm", "max_channel"}, ...]},
                         "value": {... the same for the values}},
                        ...],
             "timing": {"wall_s": seconds, "threads": torch threads},
             "created": ISO time}

    Raises:
        KeyStatsError, tq.tasks.trace_export.TraceExportError, tq.models.checkpoint.CheckpointError:
            see :func:`cached_keys_values`; ValueError from :func:`tq.data.corpus.draw_windows` when
            the corpus holds too few windows of that length.
    """
    import torch

    from tq.data.corpus import draw_windows
    from tq.models.checkpoint import Checkpoint

    start = time.perf_counter()
    name = model_name if model_name is not None else Path(model_dir).resolve().name
    if token_ids is None:
        ids, drawn = draw_windows(
            Checkpoint.load(model_dir).encode, windows, window, sample_seed, cache, corpus_file
        )
        text: str = TEXT
        described: list[dict[str, Any]] | None = [
            {"article": w.article, "title": w.title, "offset": w.offset} for w in drawn
        ]
        seed: int | None = sample_seed
    else:
        ids = _token_array(token_ids)
        text, described, seed = "given token ids", None, None
    print(
        f"tq key stats: {name}, {ids.shape[0]} windows x {ids.shape[-1]} tokens", file=sys.stderr, flush=True
    )
    per_layer = cached_keys_values(model_dir, ids)
    layers = [layer_statistics(k, v, layer) for layer, (k, v) in enumerate(per_layer)]
    return {
        "schema": SCHEMA,
        "model": name,
        "text": text,
        "sample_seed": seed,
        "windows": int(ids.shape[0]),
        "window": int(ids.shape[1]),
        "text_windows": described,
        "num_layers": len(layers),
        "layers": layers,
        "timing": {"wall_s": time.perf_counter() - start, "threads": torch.get_num_threads()},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }

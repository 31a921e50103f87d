"""Flattening result records into the tables the ``aggregate`` rule writes: one row per record
(summary.csv), one per perplexity window (per_window.csv) and one per scored token
(per_token.parquet), and reading them back with the same columns and types."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tq.core.fileio import atomic_write_bytes
from tq.report.records import PER_WINDOW_FIELDS, RecordError, check_record, has_windows
from tq.tasks.stats import PER_TOKEN_FIELDS

# The sweep coordinates, always present in this order (empty where a record has none).
# ``bits`` is the synthetic quantizer's width; for a KV cache it is the mean code width of the
# quantized streams (keys and values; an exact stream does not count), empty when both are exact.
COORDINATES = (
    "source",
    "workload",
    "model",
    "mode",
    "protocol",
    "dim",
    "bits",
    "strategy",
    "key_bits",
    "value_bits",
    "key_strategy",
    "value_strategy",
    "group_size",
    "residual_length",
    "exact_layers",
    "quantized_layers",
    "renormalize",
    "norm_dtype",
    "rotation",
    "center_keys",
    "fp8_scale",
    "setting",
    "seed",
    "layer",
    "head",
    "rope",
    "head_dim",
    "n",
    "samples",
    "seq_len",
    "prompts",
    "max_new_tokens",
    "top_k",
    "sample_seed",
    "windows",
    "window",
    "context",
    "se_unit",
    "threads",
    "quick",
    "kernels",
    "device",
    "trace",
    "model_dir",
    "engine",
    "dtype",
)
PROVENANCE = ("tq_version", "created")
# Coordinates that are text in the CSV whatever they look like ("0,29" or "4" stay strings).
_TEXT_COLUMNS = (
    "source",
    "workload",
    "model",
    "mode",
    "protocol",
    "strategy",
    "key_strategy",
    "value_strategy",
    "exact_layers",
    "quantized_layers",
    "norm_dtype",
    "rotation",
    "fp8_scale",
    "setting",
    "rope",
    "se_unit",
    "kernels",
    "device",
    "trace",
    "model_dir",
    "engine",
    "dtype",
    "tq_version",
    "created",
)
_BOOL_COLUMNS = ("renormalize", "center_keys", "quick")
_CACHE_FIELDS = (
    "key_bits",
    "value_bits",
    "key_strategy",
    "value_strategy",
    "group_size",
    "residual_length",
    "renormalize",
    "norm_dtype",
    "seed",
    "rotation",
    "device",
    "center_keys",
    "fp8_scale",
)


# What tells perplexity records apart in per_window.csv and the per-token file: the coordinates of
# summary.csv that make a setting, the window set (seed and shape), and the text they come from.
WINDOW_SETTINGS = (
    "model",
    "protocol",
    "bits",
    "key_strategy",
    "key_bits",
    "value_strategy",
    "value_bits",
    "group_size",
    "residual_length",
    "exact_layers",
    "quantized_layers",
    "renormalize",
    "norm_dtype",
    "rotation",
    "center_keys",
    "fp8_scale",
    "setting",
    "seed",
    "device",
    "engine",
    "dtype",
    "sample_seed",
    "windows",
    "window",
    "context",
    "text",
)
# The window set of a perplexity record: all cache settings of a model are scored on it.
WINDOW_SET = ("sample_seed", "windows", "window", "context")
PER_WINDOW_COLUMNS = (*WINDOW_SETTINGS, "window_index", "article", "title", "offset", *PER_WINDOW_FIELDS)
PER_TOKEN_COLUMNS = (*WINDOW_SETTINGS, "window_index", "position", *PER_TOKEN_FIELDS)
_WINDOW_TEXT_COLUMNS = ("text", "title")
_WINDOW_INTEGER_COLUMNS = ("window_index", "article", "offset", "position", "tokens")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict under dotted names; None becomes NaN, lists and text are
    skipped."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif value is None:
            flat[name] = math.nan
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _cache_bits(cache: dict[str, Any]) -> float | None:
    widths = [cache[f"{part}_bits"] for part in ("key", "value") if cache[f"{part}_strategy"] != "exact"]
    return float(np.mean(widths)) if widths else None


def _coordinates(record: dict[str, Any]) -> dict[str, Any]:
    config = record["config"]
    row: dict[str, Any] = {name: config.get(name) for name in COORDINATES if name in config}
    row["source"] = record["source"]
    row["workload"] = config.get("workload", record["source"])
    cache = config.get("cache")
    if isinstance(cache, dict):
        row.update({name: cache[name] for name in _CACHE_FIELDS if name in cache})
        if "key_strategy" in cache and "value_strategy" in cache:
            row["bits"] = _cache_bits(cache)
    for name in ("exact_layers", "quantized_layers"):
        if isinstance(row.get(name), list):
            row[name] = ",".join(str(layer) for layer in row[name]) or "none"
    row["setting"] = record.get("setting")  # the sweep's name of the cache setting, if any
    row["tq_version"] = record.get("env", {}).get("tq") if isinstance(record.get("env"), dict) else None
    row["created"] = record.get("created")
    return row


def summary_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per record: the sweep coordinates (:data:`COORDINATES`), every numeric metric
    (nested ones as dotted names such as ``quantized_kv.kv_compression_ratio``; lists such as
    ``per_prompt`` are left out), the timing figures as ``timing.<name>``, then ``tq_version``
    and ``created``.

    Columns: the coordinates in their fixed order, metrics and timings each in name order, so
    the same records always give the same columns; a metric whose name is also a coordinate
    (the trace workload's ``key_bits``) is ``metrics.<name>``. Rows are sorted by the
    coordinates, so the order of the records does not matter.
    """
    rows, metric_names, timing_names = [], set(), set()
    for record in records:
        problem = check_record(record)
        if problem:
            raise RecordError(f"record {len(rows)}: {problem}")
        row = _coordinates(record)
        metrics = {
            (f"metrics.{name}" if name in COORDINATES else name): value
            for name, value in _flatten(record["metrics"]).items()
        }
        timing = _flatten(record["timing"], "timing.")
        metric_names.update(metrics)
        timing_names.update(timing)
        rows.append(row | metrics | timing)
    columns = [*COORDINATES, *sorted(metric_names), *sorted(timing_names), *PROVENANCE]
    table = pd.DataFrame.from_records(rows, columns=columns)
    return typed(table).sort_values(columns, kind="stable", na_position="last").reset_index(drop=True)


def typed(table: pd.DataFrame) -> pd.DataFrame:
    """Text columns as strings, flags as nullable booleans, everything else as float."""
    table = table.copy()
    for name in table.columns:
        if name in _TEXT_COLUMNS:
            table[name] = table[name].astype("string")
        elif name in _BOOL_COLUMNS:
            table[name] = table[name].astype("boolean")
        else:
            table[name] = pd.to_numeric(table[name]).astype("float64")
    return table


def write_summary(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the summary table as CSV, atomically."""
    atomic_write_bytes(path, table.to_csv(index=False).encode())


def read_summary(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV written by :func:`write_summary` back with the same columns and types."""
    table = pd.read_csv(path, dtype={name: "string" for name in _TEXT_COLUMNS})
    return typed(table)


# ---------------------------------------------------------------- per-window and per-token tables


def typed_windows(table: pd.DataFrame) -> pd.DataFrame:
    """Types of the per-window and per-token tables: those of :func:`typed`, the window's title
    and the text as strings, indices, articles, offsets and token counts as integers."""
    special = [name for name in table.columns if name in (*_WINDOW_TEXT_COLUMNS, *_WINDOW_INTEGER_COLUMNS)]
    result = typed(table.drop(columns=special))
    for name in special:
        result[name] = table[name].astype("string" if name in _WINDOW_TEXT_COLUMNS else "int64")
    return result[list(table.columns)]


def _windowed_records(records: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The perplexity records with per-window values, each with its setting (the
    :data:`WINDOW_SETTINGS` values), ordered by setting as the summary rows are; every record's
    envelope and per-window values are checked (:class:`RecordError`)."""
    chosen = []
    for index, record in enumerate(records):
        problem = check_record(record)
        if problem:
            raise RecordError(f"record {index}: {problem}")
        if has_windows(record):
            row = _coordinates(record) | {"text": record["config"].get("text")}
            chosen.append(({name: row.get(name) for name in WINDOW_SETTINGS}, record))
    settings = pd.DataFrame.from_records([setting for setting, _ in chosen], columns=list(WINDOW_SETTINGS))
    settings = typed_windows(settings)
    order = settings.sort_values(list(WINDOW_SETTINGS), kind="stable", na_position="last").index
    return [chosen[index] for index in order]


def per_window_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per perplexity record and window (:data:`PER_WINDOW_COLUMNS`): the record's setting
    (:data:`WINDOW_SETTINGS`, as in summary.csv), the window's index, article, title and token
    offset (``config.text_windows``), and its per-window figures (``metrics.per_window``: means over
    the window's scored tokens, and ``tokens``). Records without per-window values (other
    workloads, older perplexity records) give no rows.

    Raises:
        RecordError: a record is not a valid record, or its per-window values are inconsistent.
    """
    rows = []
    for setting, record in _windowed_records(records):
        per_window = record["metrics"]["per_window"]
        for index, described in enumerate(record["config"]["text_windows"]):
            where = {name: described[name] for name in ("article", "title", "offset")}
            figures = {name: per_window[name][index] for name in PER_WINDOW_FIELDS}
            rows.append(setting | {"window_index": index} | where | figures)
    return typed_windows(pd.DataFrame.from_records(rows, columns=list(PER_WINDOW_COLUMNS)))


def per_token_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per scored token of every perplexity record with per-window values
    (:data:`PER_TOKEN_COLUMNS`): the record's setting as in :func:`per_window_table`, the token's
    window index and its position among that window's scored tokens (0 = the first), and its
    per-token values (``metrics.per_token``), for users' own statistics.

    Raises:
        RecordError: as :func:`per_window_table`.
    """
    parts = [pd.DataFrame(columns=list(PER_TOKEN_COLUMNS))]
    for setting, record in _windowed_records(records):
        per_token = record["metrics"]["per_token"]
        window_of = pd.Series(np.asarray(per_token["window"], dtype=np.int64))
        values = {name: np.asarray(per_token[name], dtype=np.float64) for name in PER_TOKEN_FIELDS}
        where = {"window_index": window_of, "position": window_of.groupby(window_of).cumcount()}
        part = pd.DataFrame(where | values).assign(**setting)
        parts.append(part[list(PER_TOKEN_COLUMNS)])
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return typed_windows(table)


def write_per_window(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write :func:`per_window_table` as CSV, atomically."""
    atomic_write_bytes(path, table.to_csv(index=False).encode())


def read_per_window(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV written by :func:`write_per_window` back with the same columns and types."""
    text = (*_TEXT_COLUMNS, *_WINDOW_TEXT_COLUMNS)
    return typed_windows(pd.read_csv(path, dtype={name: "string" for name in text}))


def write_per_token(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write :func:`per_token_table` as Parquet (one columnar file), atomically."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_per_token(path: str | os.PathLike) -> pd.DataFrame:
    """Read a file written by :func:`write_per_token` back with the same columns and types."""
    return typed_windows(pd.read_parquet(path))

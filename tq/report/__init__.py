"""Turning result records (docs/design.md section 4) into one summary table and a markdown report.

The pipeline's ``aggregate`` rule reads result JSON files with :func:`load_records`, flattens
them with :func:`summary_table` and writes the CSV with :func:`write_summary`; beside it, the
perplexity records' per-window values (:func:`per_window_table`, per_window.csv) and per-token
values (:func:`per_token_table`, per_token.parquet). The ``report`` rule reads the summary and
the per-window values back (:func:`read_summary`, :func:`read_per_window`) and writes
``report.md`` and its PNG plots with :func:`write_report`. Every number in the report comes from
those tables: nothing is hard-coded, and a section without records is replaced by a one-line
note. Perplexity figures carry standard errors with the text window as the unit, and two
settings are compared by their paired per-window differences (:func:`paired_nll`).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tq.core.fileio import atomic_write_bytes
from tq.quant.uniform import BASELINE_STRATEGIES
from tq.tasks.records import SCHEMA, SOURCES
from tq.tasks.stats import PER_TOKEN_FIELDS, cluster_mean_se

REPORT_NAME = "report.md"

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
# The per-window figures of a perplexity record (``metrics.per_window``): each window's mean over
# its scored tokens, and how many it scored.
PER_WINDOW_FIELDS = ("tokens", "exact_nll", "quantized_nll", "kl", "top1_match", "delta_p", "delta_p_sq")
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
# Cache settings other than the strategies that tell two lines of a quality plot apart.
_LINE_SETTINGS = (
    "residual_length",
    "exact_layers",
    "renormalize",
    "norm_dtype",
    "rotation",
    "center_keys",
    "fp8_scale",
)

HONEST_NOTE = """\
- **Attention is still float.** In the real-model runs ONNX Runtime computes ordinary float
  attention over the *reconstruction* of the quantized cache. What is quantized is what the
  cache stores between calls; there is no quantized attention kernel, so decode speed here says
  nothing about a fused kernel's speed.
- **The current call's own keys and values are exact.** The graph computes them within the call
  and uses them for that call's attention; they are quantized as they enter the cache and only
  later calls see the quantized versions. A long prefill therefore attends to itself exactly.
- **Stored bits count everything.** Compression ratios divide fp32 bytes by every byte the cache
  keeps: codes, per-vector norms (and Prod's residual norms and sign bits), and any tokens or
  layers kept exact. The nominal code width (`bits`) is not the storage cost.
- **Teacher-forced cross-entropy is a drift measure.** In compare mode the quantized run is scored
  on the exact run's own greedy tokens: its "perplexity" measures how far the quantized model
  drifts from the exact one, not how well either predicts a dataset. Only the perplexity section
  scores real text."""

# Protocols in the order the report leads with them, and how the report names them.
PROTOCOL_ORDER = ("decode", "window")
PROTOCOL_LABELS = {"window": "window, quantized context only"}

PROTOCOL_NOTES = {
    "window": "`window` (quantized context only): the context is prefilled in one call and stored in "
    "the cache (quantized or not); the scored continuation is fed in one more call, so it reads the "
    "context through the cache but attends to its own tokens exactly. It measures a quantized context "
    "only, which flatters the cache (docs/design.md section 10).",
    "decode": "`decode` (docs/design.md section 10): the context is prefilled, then the continuation is "
    "decoded one token at a time with teacher forcing, every new token's keys and values quantized "
    "as they enter the cache, as a decoding server with a quantized cache would see it.",
}


# A 95% interval is value ± Z95 · SE (normal approximation); every interval in the report uses it.
Z95 = 1.96
BARS_NOTE = f"bars: 95% intervals, ± {Z95} SE"
PAIRED_NOTE = (
    "Two settings of a model are compared by their paired per-window differences (both are scored "
    "on the same windows and share the exact reference): for the perplexity ratio, per window, the "
    "difference of the two settings' mean quantized NLL, averaged over the windows with its "
    f"window-level SE. They are called different only when its 95% interval (± {Z95} SE) excludes "
    '0, "not distinguishable on N windows" otherwise. A setting is compared with exact by its own '
    "per-window difference, quantized - exact NLL, the one its ratio's ± comes from."
)


class RecordError(ValueError):
    """A result file is unreadable or not a ``tq.result/1`` record; the message names the file."""


class ReportError(ValueError):
    """The records cannot be reported as they are (a row would pool two records of one setting)."""


# ----------------------------------------------------------------------------------- records


def _check_record(record: Any) -> str | None:
    """What is wrong with a parsed record, or None when its envelope is valid."""
    if not isinstance(record, dict):
        return f"a record is a JSON object, got {type(record).__name__}"
    if record.get("schema") != SCHEMA:
        return f"schema must be {SCHEMA!r}, got {record.get('schema')!r}"
    if record.get("source") not in SOURCES:
        return f"source must be one of {SOURCES}, got {record.get('source')!r}"
    for part in ("config", "metrics", "timing"):
        if not isinstance(record.get(part), dict):
            return f"{part!r} must be a JSON object, got {type(record.get(part)).__name__}"
    return _check_windows(record)


def _has_windows(record: dict[str, Any]) -> bool:
    """Whether a record is a perplexity record with per-window values (``metrics.per_window``)."""
    return record["config"].get("workload") == "perplexity" and "per_window" in record["metrics"]


def _lengths(values: Any, names: Sequence[str], where: str) -> tuple[int | None, str | None]:
    """The common length of the lists ``names`` of a dict, or what is wrong with them."""
    if not isinstance(values, dict):
        return None, f"{where} must be a JSON object of lists, got {type(values).__name__}"
    missing = [name for name in names if name not in values]
    if missing:
        return None, f"{where} lacks {', '.join(missing)}"
    if not all(isinstance(values[name], list) for name in names):
        return None, f"{where} must hold lists"
    lengths = {name: len(values[name]) for name in names}
    if len(set(lengths.values())) != 1:
        return None, f"{where} lists differ in length: " + ", ".join(f"{k} {v}" for k, v in lengths.items())
    return next(iter(lengths.values())), None


def _check_windows(record: dict[str, Any]) -> str | None:
    """What is wrong with the per-window and per-token values of a perplexity record, or None:
    every ``per_window`` list holds one entry per window (``config.windows``), ``text_windows``
    describes each window, and the ``per_token`` lists (one entry per scored token) give each
    window the tokens ``per_window.tokens`` says it scored."""
    if not _has_windows(record):
        return None
    config, metrics = record["config"], record["metrics"]
    count, problem = _lengths(metrics["per_window"], PER_WINDOW_FIELDS, "metrics.per_window")
    if problem:
        return problem
    if count != config.get("windows"):
        return f"metrics.per_window has {count} windows, config.windows is {config.get('windows')!r}"
    described = config.get("text_windows")
    if not isinstance(described, list) or len(described) != count:
        return f"config.text_windows must describe the {count} windows"
    if not all(isinstance(w, dict) and {"article", "title", "offset"} <= w.keys() for w in described):
        return "config.text_windows entries need article, title and offset"
    _, problem = _lengths(metrics.get("per_token"), [*PER_TOKEN_FIELDS, "window"], "metrics.per_token")
    if problem:
        return problem
    window_of = np.asarray(metrics["per_token"]["window"], dtype=np.int64)
    if window_of.size and (window_of.min() < 0 or window_of.max() >= count):
        return f"metrics.per_token.window must index the {count} windows"
    if np.bincount(window_of, minlength=count).tolist() != metrics["per_window"]["tokens"]:
        return "metrics.per_token.window does not give each window its per_window.tokens"
    return None


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read result JSON files, in the order given, and validate each envelope.

    Raises:
        RecordError: a file cannot be read, is not JSON, or is not a ``tq.result/1`` record of
            a known source; the message names the file and the problem.
    """
    records = []
    for path in paths:
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except OSError as error:
            raise RecordError(f"{path}: cannot read ({error.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordError(f"{path}: not valid JSON ({error})") from None
        problem = _check_record(record)
        if problem:
            raise RecordError(f"{path}: not a result record: {problem}")
        records.append(record)
    return records


# ----------------------------------------------------------------------------------- table


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
        problem = _check_record(record)
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
    return _typed(table).sort_values(columns, kind="stable", na_position="last").reset_index(drop=True)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
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
    return _typed(table)


# ---------------------------------------------------------------- per-window and per-token tables


def _typed_windows(table: pd.DataFrame) -> pd.DataFrame:
    """Types of the per-window and per-token tables: those of :func:`_typed`, the window's title
    and the text as strings, indices, articles, offsets and token counts as integers."""
    special = [name for name in table.columns if name in (*_WINDOW_TEXT_COLUMNS, *_WINDOW_INTEGER_COLUMNS)]
    typed = _typed(table.drop(columns=special))
    for name in special:
        typed[name] = table[name].astype("string" if name in _WINDOW_TEXT_COLUMNS else "int64")
    return typed[list(table.columns)]


def _windowed_records(records: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The perplexity records with per-window values, each with its setting (the
    :data:`WINDOW_SETTINGS` values), ordered by setting as the summary rows are; every record's
    envelope and per-window values are checked (:class:`RecordError`)."""
    chosen = []
    for index, record in enumerate(records):
        problem = _check_record(record)
        if problem:
            raise RecordError(f"record {index}: {problem}")
        if _has_windows(record):
            row = _coordinates(record) | {"text": record["config"].get("text")}
            chosen.append(({name: row.get(name) for name in WINDOW_SETTINGS}, record))
    settings = pd.DataFrame.from_records([setting for setting, _ in chosen], columns=list(WINDOW_SETTINGS))
    settings = _typed_windows(settings)
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
    return _typed_windows(pd.DataFrame.from_records(rows, columns=list(PER_WINDOW_COLUMNS)))


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
    return _typed_windows(table)


def write_per_window(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write :func:`per_window_table` as CSV, atomically."""
    atomic_write_bytes(path, table.to_csv(index=False).encode())


def read_per_window(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV written by :func:`write_per_window` back with the same columns and types."""
    text = (*_TEXT_COLUMNS, *_WINDOW_TEXT_COLUMNS)
    return _typed_windows(pd.read_csv(path, dtype={name: "string" for name in text}))


def write_per_token(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write :func:`per_token_table` as Parquet (one columnar file), atomically."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_per_token(path: str | os.PathLike) -> pd.DataFrame:
    """Read a file written by :func:`write_per_token` back with the same columns and types."""
    return _typed_windows(pd.read_parquet(path))


# ------------------------------------------------------------------------------ formatting


def _missing(value: Any) -> bool:
    """Whether a cell holds no value (None, NA or NaN)."""
    return value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _format(value: Any) -> str:
    if _missing(value):
        return "-"
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame, headers: dict[str, str]) -> str:
    """A GitHub markdown table of the columns named in ``headers`` (column -> header text);
    numbers to 4 significant digits, missing values as "-"."""
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_format(row[name]) for name in headers) + " |")
    return "\n".join(lines)


def _pm(value: Any, se: Any, percent: bool = False) -> str:
    """A value and its standard error as "1.194 ± 0.012", both to the SE's second significant
    digit; the value alone (as :func:`_format` writes it) without an SE, "-" without a value.
    ``percent``: both as percentages ("50 ± 25%")."""
    if _missing(value):
        return "-"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    value = float(value) * scale
    if _missing(se):
        return f"{_format(value)}{unit}"
    se = float(se) * scale
    if se <= 0:
        return f"{_format(value)} ± 0{unit}"
    decimals = max(0, 1 - math.floor(math.log10(se)))
    return f"{value:.{decimals}f} ± {se:.{decimals}f}{unit}"


def _se(row: pd.Series, name: str) -> Any:
    """The standard error of metric ``name`` in a row (its ``<name>_se`` cell), NaN without one."""
    return row.get(f"{name}_se", math.nan)


def _with_errors(table: pd.DataFrame, names: Iterable[str]) -> pd.DataFrame:
    """The table with each column of ``names`` that has a ``<name>_se`` column shown as text
    "value ± SE" (:func:`_pm`); other columns, and rows without an SE, keep the value alone."""
    shown = {
        name: [_pm(value, se) for value, se in zip(table[name], table[f"{name}_se"], strict=True)]
        for name in names
        if name in table and f"{name}_se" in table
    }
    return table.assign(**shown)


def _same_value(a: Any, b: Any) -> bool:
    """Whether two cells hold the same value, two missing values counting as the same."""
    return (_missing(a) and _missing(b)) or (not _missing(a) and not _missing(b) and a == b)


class _WindowValues:
    """The per-window values of the perplexity records (:func:`per_window_table`, read back from
    per_window.csv), found by the setting a report row shows."""

    def __init__(self, per_window: pd.DataFrame | None) -> None:
        table = per_window if per_window is not None else pd.DataFrame(columns=list(PER_WINDOW_COLUMNS))
        table = _typed_windows(table)
        self._records = [
            (dict(zip(WINDOW_SETTINGS, key, strict=True)), windows.sort_values("window_index"))
            for key, windows in table.groupby(list(WINDOW_SETTINGS), dropna=False, sort=False)
        ]

    def of(self, row: pd.Series) -> pd.DataFrame | None:
        """The windows of the one record whose setting ``row`` shows, in window order; None when
        no record with per-window values has it. A row matches a record on every setting of
        :data:`WINDOW_SETTINGS` it has; a row without ``quantized_layers`` shows a whole-model
        setting (none).

        Raises:
            ReportError: two records match (the row would pool them).
        """
        shown = [name for name in WINDOW_SETTINGS if name in row.index]
        found = [
            windows
            for setting, windows in self._records
            if all(_same_value(setting[name], row[name]) for name in shown)
            and ("quantized_layers" in shown or _missing(setting["quantized_layers"]))
        ]
        if len(found) > 1:
            raise ReportError(f"{len(found)} perplexity records match one report row: {dict(row)}")
        return found[0] if found else None

    def articles(self, rows: pd.DataFrame) -> list[int]:
        """How many distinct articles the windows of each record of ``rows`` come from (records
        with per-window values only), sorted."""
        found = [self.of(row) for _, row in rows.iterrows()]
        return sorted(windows["article"].nunique() for windows in found if windows is not None)

    def texts(self, rows: pd.DataFrame) -> list[str]:
        """The descriptions of the text the windows of ``rows`` come from (``config.text``)."""
        found = [self.of(row) for _, row in rows.iterrows()]
        texts = {windows["text"].iloc[0] for windows in found if windows is not None}
        return sorted(str(text) for text in texts if not _missing(text))


class Paired:
    """A paired comparison over windows: per window a difference of mean NLLs (nats), and the
    token-weighted mean of those differences with its window-level (cluster-robust) standard
    error, :func:`tq.tasks.stats.cluster_mean_se` of the per-token differences they summarize."""

    def __init__(self, differences: np.ndarray, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        self.windows = len(tokens)
        values = np.repeat(np.asarray(differences, dtype=np.float64), tokens)
        self.mean, self.se = cluster_mean_se(values, np.repeat(np.arange(self.windows), tokens))

    @property
    def different(self) -> bool:
        """Whether the 95% interval of the mean difference, ± Z95 · SE, excludes 0 (no claim
        without an SE: fewer than two windows)."""
        return self.se is not None and abs(self.mean) > Z95 * self.se


def _same_windows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two records were scored on the same windows: the same articles, offsets and scored
    tokens, window by window."""
    columns = ["article", "offset", "tokens"]
    return len(a) == len(b) and bool((a[columns].to_numpy() == b[columns].to_numpy()).all())


def paired_nll(a: pd.DataFrame | None, b: pd.DataFrame | None) -> Paired | None:
    """Setting ``a`` against setting ``b`` by their paired per-window differences (per-window
    values as :meth:`_WindowValues.of` returns them): per window, the mean quantized NLL of ``a``
    minus that of ``b``. The exact side is shared, so this is the difference of their quantized -
    exact NLLs, and its mean is log(ratio a / ratio b). None when a side has no per-window values
    or the two were not scored on the same windows."""
    if a is None or b is None or not _same_windows(a, b):
        return None
    return Paired(a["quantized_nll"].to_numpy() - b["quantized_nll"].to_numpy(), a["tokens"].to_numpy())


def _against_exact(row: pd.Series) -> bool | None:
    """Whether a setting's perplexity ratio differs from 1.0 (exact) by its own paired difference,
    quantized - exact NLL per unit (window or prompt): that difference's mean is log(ratio) and
    its SE ``perplexity_ratio_se`` / ratio (tq.tasks.stats, delta method), and it differs when the 95%
    interval excludes 0. None without a ratio or its standard error."""
    ratio, se = row.get("perplexity_ratio"), _se(row, "perplexity_ratio")
    if _missing(ratio) or _missing(se) or ratio <= 0:
        return None
    return bool(abs(math.log(ratio)) > Z95 * se / ratio)


def _counted(counts: Iterable[Any], unit: str) -> str:
    """Counts of some unit as "16 windows" or "8 to 16 windows" (one count: "1 window")."""
    counts = sorted({int(count) for count in counts if not _missing(count)})
    if not counts:
        return f"an unrecorded number of {unit}s"
    low, high = counts[0], counts[-1]
    return f"{low} {unit}{'s' if high != 1 else ''}" if low == high else f"{low} to {high} {unit}s"


def _units(rows: pd.DataFrame) -> str:
    """What the standard errors of some rows rest on: "8 windows" for perplexity records, "4
    prompts" for compare records."""
    if (_column(rows, "workload") == "perplexity").all():
        return _counted(_column(rows, "windows"), "window")
    return _counted(_column(rows, "prompts"), "prompt")


def _not_distinguishable(found: Sequence[pd.DataFrame | None]) -> str:
    """How to say that differences between some records (their per-window values, None where a
    record has none) are not established: "not distinguishable on N windows", or why they were
    not tested."""
    if not found or any(windows is None for windows in found):
        return "not tested, no per-window values recorded"
    if any(not _same_windows(found[0], windows) for windows in found[1:]):
        return "not tested, not scored on the same windows"
    return f"not distinguishable on {_counted((len(windows) for windows in found), 'window')}"


def _ranking(rows: pd.DataFrame, label: Callable[[pd.Series], str], windows: _WindowValues) -> str:
    """Rows by perplexity ratio, lowest first, as "A 1.05 ± 0.01 ≈ B 1.06 ± 0.01 < C 1.30 ± 0.02".

    A "<" stands only where every row before it differs from every row after it by their paired
    per-window differences (:func:`paired_nll`: the 95% interval of the mean difference excludes
    0); elsewhere "≈", and the text ends by saying what "≈" means. Rows without a value are left
    out.
    """
    metric = "perplexity_ratio"
    rows = rows.dropna(subset=[metric]).sort_values(metric, kind="stable")
    found = [windows.of(row) for _, row in rows.iterrows()]
    parts = []
    for index, (_, row) in enumerate(rows.iterrows()):
        if index:
            separated = all(
                (paired := paired_nll(after, before)) is not None and paired.different
                for before in found[:index]
                for after in found[index:]
            )
            parts.append("<" if separated else "≈")
        parts.append(f"{label(row)} {_pm(row[metric], _se(row, metric))}")
    note = f" (≈: {_not_distinguishable(found)})" if "≈" in parts else ""
    return " ".join(parts) + note


def _window_sets(rows: pd.DataFrame, windows: _WindowValues) -> str:
    """The windows some perplexity rows were scored on, per window set: "16 windows of 1024 tokens
    (512 of context, 512 scored) drawn from seed 0 across 16 distinct articles"."""
    described = []
    for (seed, count, window, context), group in rows.groupby(list(WINDOW_SET), dropna=False, sort=True):
        text = f"{_counted([count], 'window')} of {_format(window)} tokens ({_format(context)} of context"
        text += f", {_format(window - context)} scored)" if not _missing(window - context) else ")"
        articles = windows.articles(group)
        if not _missing(seed):
            text += f" drawn from seed {_format(seed)}"
        if articles and articles[0] == articles[-1]:
            text += f" across {articles[0]} distinct article{'s' if articles[0] != 1 else ''}"
        elif articles:
            text += f" across {articles[0]} to {articles[-1]} distinct articles (per record)"
        described.append(text)
    return "; ".join(described)


def _text_note(rows: pd.DataFrame, windows: _WindowValues) -> str:
    """What text some perplexity rows were scored on and what their ± means (said once, in the
    perplexity section and the notes)."""
    texts = windows.texts(rows)
    tested = rows[_column(rows, "se_unit") == "window"]
    counts = sorted(_column(tested, "windows").dropna().unique())
    over = "-".join(_format(count) for count in ([counts[0], counts[-1]] if len(counts) > 1 else counts))
    note = (
        f"**The text and the ±.** {'; '.join(texts) + ': ' if texts else ''}{_window_sets(rows, windows)}. "
        + (
            f"± is one standard error with the window as the unit, over {over} windows; the per-token "
            "SE, which treats tokens as independent, is `<name>_se_token` in summary.csv. "
            if counts
            else ""
        )
        + PAIRED_NOTE
    )
    older = len(rows) - len(tested)
    if older:
        note += (
            f" {older} record{'s' if older != 1 else ''} without window-level standard errors (older "
            f"runs) show{'' if older != 1 else 's'} values alone and {'are' if older != 1 else 'is'} not "
            "tested."
        )
    return note


def _window_errors_only(table: pd.DataFrame) -> pd.DataFrame:
    """The table with the standard errors of every perplexity record whose ± is not window-level
    (``se_unit`` "window") and every compare record whose ± is not prompt-level (``se_unit``
    "prompt") removed: older records' per-token SEs are too small to show as "how sure"."""
    unit = _column(table, "se_unit")
    perplexity = (table["workload"] == "perplexity") & (unit != "window").fillna(True)
    compare = table["workload"].eq("real-model") & table["mode"].eq("compare")
    drop = (perplexity | (compare & (unit != "prompt").fillna(True))).fillna(False).astype(bool)
    errors = [name for name in table.columns if name.endswith("_se")]
    table = table.copy()
    table.loc[drop, errors] = math.nan
    return table


def _protocol_label(protocol: Any) -> str:
    """A perplexity protocol as the report names it ("window, quantized context only")."""
    return PROTOCOL_LABELS.get(protocol, _format(protocol))


def _decode_first(table: pd.DataFrame) -> pd.DataFrame:
    """The rows reordered, stably, so that the decode protocol leads, then window, then the rest
    (rows without a protocol last)."""
    protocols = _column(table, "protocol")
    rank = [
        PROTOCOL_ORDER.index(p) if not _missing(p) and p in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
        for p in protocols
    ]
    return table.iloc[np.argsort(rank, kind="stable")]


def _strategy(row: pd.Series, part: str) -> str:
    """A stream in words: "mse 3", "exact", or for a baseline with its group size "kivi 2 g32"."""
    strategy = row[f"{part}_strategy"]
    if strategy == "exact":
        return "exact"
    text = f"{strategy} {_format(row[f'{part}_bits'])}"
    if strategy in BASELINE_STRATEGIES and pd.notna(row.get("group_size")):
        text += f" g{_format(row['group_size'])}"
    if strategy == "fp8" and row.get("fp8_scale") == "head":
        text += " per-head scale"
    if part == "key" and not _missing(row.get("center_keys")) and bool(row["center_keys"]):
        text += " centred"
    return text


def _with_cache_labels(means: pd.DataFrame) -> pd.DataFrame:
    """Add ``keys`` and ``values`` columns such as "mse 3" or "exact" for the tables."""
    return means.assign(
        keys=means.apply(_strategy, axis=1, part="key"), values=means.apply(_strategy, axis=1, part="value")
    )


def _line_label(row: pd.Series, settings: Sequence[str]) -> str:
    label = f"K {row['key_strategy']} / V {row['value_strategy']}"
    extras = [f"{name}={_format(row[name])}" for name in settings]
    return ", ".join([label, *extras])


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    """A column, or NaN where the table has no such column."""
    return table[name] if name in table else pd.Series(math.nan, index=table.index)


def _varying(table: pd.DataFrame, names: Iterable[str]) -> list[str]:
    """The columns among ``names`` that take more than one value in ``table``."""
    return [name for name in names if table[name].nunique(dropna=False) > 1]


def _combined_se(errors: pd.Series) -> float:
    """The standard error of a mean of k independent estimates, sqrt(sum se²) / k; NaN when one
    of them has no standard error."""
    if errors.isna().any():
        return math.nan
    return math.sqrt((errors**2).sum()) / len(errors)


def _check_pooling(grouped: Any, keys: list[str], over: Sequence[str]) -> None:
    """Refuse a row that would pool two records of one setting: within a group of ``keys``,
    the records must differ in the coordinates ``over`` (the traces a row averages over, say).

    Raises:
        ReportError: naming the row and the coordinates its records differ in, if any (ones
            the row does not show), or saying that they are the same setting twice.
    """
    for values, group in grouped:
        if len(group) < 2:
            continue
        repeated = group.duplicated(list(over), keep=False) if over else np.ones(len(group), dtype=bool)
        if not repeated.any():
            continue
        shown = ", ".join(f"{key}={_format(value)}" for key, value in zip(keys, values, strict=True))
        twins = group[repeated]
        hidden = [name for name in COORDINATES if name in twins and twins[name].nunique(dropna=False) > 1]
        why = (
            f"they differ only in {', '.join(hidden)}, which the row does not show"
            if hidden
            else "they are the same setting measured twice"
        )
        raise ReportError(
            f"a report row would pool {len(twins)} records ({shown}): {why}; each setting must have one "
            "record (remove the duplicate from the sweep)"
        )


def _mean_by(
    table: pd.DataFrame, keys: list[str], values: list[str], over: Sequence[str] = ()
) -> pd.DataFrame:
    """Mean of ``values`` per group of ``keys`` (missing keys form their own group), with a count.

    A group may only pool records that differ in the coordinates ``over`` (for example the
    traces of one cache setting); two records of one setting are an error
    (:func:`_check_pooling`), never averaged silently. A value with a ``<name>_se`` column keeps
    one: the standard error of the group's mean (:func:`_combined_se`, records taken as
    independent; a group of one record keeps its own).
    """
    errors = [f"{name}_se" for name in values if f"{name}_se" in table]
    table = table.assign(**{name: math.nan for name in values if name not in table})
    grouped = table.groupby(keys, dropna=False, sort=True)
    _check_pooling(grouped, keys, over)
    result = grouped[values].mean()
    for name in errors:
        result[name] = grouped[name].agg(_combined_se)
    result["records"] = grouped.size()
    return result.reset_index()


# ----------------------------------------------------------------------------------- plots


def _save(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    atomic_write_bytes(path, buffer.getvalue())


def _figure(panels: int) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    width = 5.2 * panels  # inches; fixed margins (a layout engine would double the drawing time)
    figure = Figure(figsize=(width, 4.2))
    axes = figure.subplots(1, panels, squeeze=False)[0]
    figure.subplots_adjust(left=1.3 / width, right=1 - 0.15 / width, bottom=0.13, top=0.9, wspace=0.5)
    return figure, list(axes)


def _half_width(table: pd.DataFrame, name: str) -> pd.Series | None:
    """Half-widths of the 95% intervals of a column (Z95 · its ``<name>_se``, 0 where a point has
    none), or None when no point of it has a standard error."""
    errors = _column(table, f"{name}_se")
    return None if errors.isna().all() else Z95 * errors.fillna(0.0)


def _draw(
    axis: Any, x: pd.Series, y: pd.Series, half_width: pd.Series | None, label: str, **style: Any
) -> str:
    """One line of points, with error bars of ``half_width`` when given; return its colour."""
    if half_width is None:
        (line,) = axis.plot(x, y, marker="o", label=label, **style)
    else:
        line = axis.errorbar(x, y, yerr=half_width, marker="o", capsize=3, label=label, **style).lines[0]
    return line.get_color()


def _plot_lines(
    axis: Any,
    table: pd.DataFrame,
    line_keys: list[str],
    y: str,
    label: Callable[[pd.Series], str],
    x: str = "bits",
    **style: Any,
) -> bool:
    """One line per group of ``line_keys``: ``y`` against ``x``, points without a value left out,
    with 95% error bars where ``y`` has standard errors; return whether any bar was drawn."""
    bars = False
    for _, line in table.groupby(line_keys, dropna=False, sort=True):
        line = line.dropna(subset=[x, y]).sort_values(x)
        if len(line):
            half_width = _half_width(line, y)
            _draw(axis, line[x], line[y], half_width, label(line.iloc[0]), **style)
            bars = bars or half_width is not None
    return bars


def _title(title: str, bars: bool, unit: str | None = None) -> str:
    """A plot title, saying what the error bars are when there are any (with the ``unit`` of
    their standard errors, such as "window", when given)."""
    if not bars:
        return title
    return f"{title}\n({BARS_NOTE}{f', {unit} as the unit' if unit else ''})"


def _finish(
    axis: Any,
    title: str,
    ylabel: str,
    bits: pd.Series,
    log: bool = False,
    bars: bool = False,
    unit: str | None = None,
) -> None:
    """Titles (with :data:`BARS_NOTE` and the SE's ``unit`` when ``bars``), the measured bit
    widths as x ticks, an optional log y axis, grid and legend."""
    axis.set_title(_title(title, bars, unit), fontsize=10)
    axis.set_xlabel("bits per coordinate")
    axis.set_xticks(sorted(bits.dropna().unique()))
    axis.set_ylabel(ylabel)
    if log:
        axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)


# -------------------------------------------------------------------------------- sections


def _synthetic(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["workload"] == "synthetic"]


def _section_distortion(table: pd.DataFrame, out_dir: Path) -> list[str]:
    rows = _synthetic(table)
    lines = ["## 1. Distortion vs bits (synthetic unit vectors)", ""]
    if rows.empty:
        return [*lines, "No synthetic records: section omitted.", ""]
    metrics = [
        "d_mse",
        "d_mse_expected",
        "d_mse_upper_bound",
        "d_mse_lower_bound",
        "ip_mse",
        "ip_bias",
        "d_prod_upper_bound",
        "d_prod_lower_bound",
        "compression_ratio",
    ]
    means = _mean_by(rows, ["dim", "strategy", "bits"], metrics)
    prod = means[means["strategy"] == "prod"]
    figure, axes = _figure(2 if len(prod) else 1)
    bounds = means.groupby("bits")[["d_mse_upper_bound", "d_mse_lower_bound"]].mean().reset_index()
    axis = axes[0]
    axis.plot(bounds["bits"], bounds["d_mse_upper_bound"], "k--", label="upper bound (√3π/2)·4^-b")
    axis.plot(bounds["bits"], bounds["d_mse_lower_bound"], "k:", label="lower bound 4^-b")
    _plot_lines(
        axis,
        means,
        ["dim", "strategy"],
        "d_mse",
        lambda row: f"d={_format(row['dim'])} {row['strategy']} measured",
    )
    _finish(axis, "D_mse = E||x - x~||² (unit x)", "D_mse", means["bits"], log=True)
    if len(prod):
        axis = axes[1]
        _plot_lines(axis, prod, ["dim"], "ip_mse", lambda row: f"d={_format(row['dim'])} prod measured")
        for bound, label, style in (
            ("d_prod_upper_bound", "upper bound √3π²/d·4^-b", "--"),
            ("d_prod_lower_bound", "lower bound 4^-b/d", ":"),
        ):
            _plot_lines(
                axis,
                prod,
                ["dim"],
                bound,
                lambda row, label=label: f"d={_format(row['dim'])} {label}",
                linestyle=style,
            )
        _finish(axis, "D_prod = E(<q,x> - <q,x~>)² (Prod)", "D_prod", prod["bits"], log=True)
    _save(figure, out_dir / "distortion_vs_bits.png")
    headers = {
        "dim": "d",
        "strategy": "strategy",
        "bits": "bits",
        "d_mse": "D_mse",
        "d_mse_expected": "D_mse Lloyd-Max",
        "d_mse_lower_bound": "lower 4^-b",
        "d_mse_upper_bound": "upper",
        "ip_mse": "D_prod (ip MSE)",
        "d_prod_upper_bound": "D_prod upper",
        "d_prod_lower_bound": "D_prod lower",
        "ip_bias": "ip bias",
        "compression_ratio": "compression",
        "records": "records",
    }
    return [
        *lines,
        "Measured distortion of unit vectors against the paper's bounds (log scale), the paper's "
        "distortion figure: D_mse of TurboQuant MSE against (√3π/2)·4^-b and 4^-b, D_prod of "
        "TurboQuant Prod against √3π²/d·4^-b and 4^-b/d. For Prod, D_mse is that of its "
        "reconstruction; D_prod is the inner-product error for unit queries.",
        "",
        "![distortion vs bits](distortion_vs_bits.png)",
        "",
        markdown_table(means, headers),
        "",
        *_distortion_findings(means),
    ]


def _distortion_findings(means: pd.DataFrame) -> list[str]:
    """What the distortion table shows, computed from it: where each measured distortion lies
    between its bounds (as multiples of the lower bound)."""
    findings = []
    checks = (
        ("mse", "d_mse", "d_mse_lower_bound", "d_mse_upper_bound", "D_mse of MSE"),
        ("prod", "ip_mse", "d_prod_lower_bound", "d_prod_upper_bound", "D_prod of Prod"),
    )
    for strategy, measured, lower, upper, name in checks:
        rows = means[(means["strategy"] == strategy)].dropna(subset=[measured, lower, upper])
        if rows.empty:
            continue
        ratio = rows[measured] / rows[lower]
        inside = int(((rows[measured] >= rows[lower]) & (rows[measured] <= rows[upper])).sum())
        widths = ", ".join(_format(b) for b in sorted(rows["bits"].unique()))
        dims = ", ".join(_format(d) for d in sorted(rows["dim"].unique()))
        findings.append(
            f"- {name} (d = {dims}; b = {widths}): within both bounds in {inside} of {len(rows)} "
            f"settings; measured / lower bound = {ratio.min():.2f} to {ratio.max():.2f} "
            f"(the upper bound is {rows[upper].iloc[0] / rows[lower].iloc[0]:.2f}x the lower)."
        )
    return _what_this_shows(findings) if findings else []


def _quality_section(
    rows: pd.DataFrame,
    title: str,
    empty: str,
    plot: str,
    metrics: list[tuple[str, str, bool]],
    extra: dict[str, str],
    out_dir: Path,
    note: str,
    over: Sequence[str] = (),
    unit: str | None = None,
) -> list[str]:
    """A quality-vs-bits figure (one panel per metric, one line per key/value strategy pair and
    any other cache setting that varies) and its table, averaged over layers, heads and runs;
    ``unit``: what the records' standard errors take as the unit, named with the error bars."""
    lines = [title, ""]
    if rows.empty:
        return [*lines, empty, ""]
    settings = _varying(rows, ["model", *_LINE_SETTINGS])
    keys = [
        "model",
        "setting",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "bits",
        "group_size",
        *_LINE_SETTINGS,
    ]
    means = _mean_by(rows, keys, [*(name for name, _, _ in metrics), *extra], over)
    quantized = means[~((means["key_strategy"] == "exact") & (means["value_strategy"] == "exact"))]
    figure, axes = _figure(len(metrics))
    for axis, (name, label, log) in zip(axes, metrics, strict=True):
        data = quantized[quantized[name] > 0] if log else quantized
        bars = _plot_lines(
            axis,
            data,
            ["key_strategy", "value_strategy", *settings],
            name,
            lambda row: _line_label(row, settings),
        )
        _finish(axis, label, label, quantized["bits"], log=log, bars=bars, unit=unit)
    _save(figure, out_dir / plot)
    means = _with_errors(_with_cache_labels(means), [name for name, _, _ in metrics])
    headers = {
        "model": "model",
        "keys": "keys",
        "values": "values",
        "residual_length": "residual",
        "exact_layers": "exact layers",
    }
    headers |= {name: label for name, label, _ in metrics} | extra | {"records": "records"}
    return [*lines, note, "", f"![{plot}]({plot})", "", markdown_table(means, headers), ""]


def _section_trace(table: pd.DataFrame, out_dir: Path) -> list[str]:
    return _quality_section(
        table[table["workload"] == "trace"],
        "## 2a. Attention quality vs bits (KV traces)",
        "No trace records: section omitted.",
        "quality_trace.png",
        [
            ("softmax_kl", "softmax KL (nats)", True),
            ("score_rmse", "score RMSE", True),
            ("output_relative_error", "output relative error", True),
            ("topk_overlap", "top-k overlap", False),
        ],
        {"compression_ratio": "compression", "stored_bits_per_coordinate": "stored bits/coord"},
        out_dir,
        "Attention of recorded queries over the exact and the quantized cache of one head, averaged "
        "over the traced layers and heads. `bits` is the mean code width of the quantized streams; "
        "caches with both streams exact are in the table only.",
        over=("trace", "layer", "head"),
    )


def _few_scored_tokens(rows: pd.DataFrame) -> list[str]:
    """A warning naming the compare records whose exact answers left fewer than half of the
    possible tokens (prompts x max_new_tokens) to score; none when every record has enough."""
    rows = rows.assign(possible=_column(rows, "prompts") * _column(rows, "max_new_tokens"))
    few = rows[_column(rows, "scored_tokens") < 0.5 * rows["possible"]]
    if few.empty:
        return []
    ended = _column(few, "prompts_ended_at_once")
    cases = sorted(
        {
            f"{row['model']} ({_format(row['scored_tokens'])} of {_format(row['possible'])} tokens"
            + (f", {_format(count)} prompts ended at once" if not _missing(count) else "")
            + ")"
            for (_, row), count in zip(few.iterrows(), ended, strict=True)
        }
    )
    return [
        f"**Few scored tokens.** {len(few)} of {len(rows)} compare records scored fewer than half "
        f"of the possible tokens (prompts x max_new_tokens): {'; '.join(cases)}. Their figures rest "
        "on few tokens; an exact answer that ends at once (an instruct model given raw text, "
        "`prompts.format: raw`) is scored on one token.",
        "",
    ]


def _section_compare(table: pd.DataFrame, out_dir: Path) -> list[str]:
    rows = table[(table["workload"] == "real-model") & (table["mode"] == "compare")]
    lines = _quality_section(
        rows,
        "## 2b. Next-token quality vs bits (real model, compare mode)",
        "No real-model compare records: section omitted.",
        "quality_compare.png",
        [
            ("top1_agreement", "top-1 agreement", False),
            ("kl_divergence", "KL(exact || quantized)", True),
            ("logit_rmse", "logit RMSE", True),
        ],
        {
            "token_match_rate": "free-run token match",
            "divergence_rate": "prompts diverged",
            "quantized_kv.kv_compression_ratio": "KV compression",
            "scored_tokens": "scored tokens",
        },
        out_dir,
        "Teacher-forced comparison of the quantized cache with the exact one on the exact run's "
        "greedy tokens (a drift measure); free-running columns decode on their own. ± and the error "
        "bars are one standard error with the prompt as the unit (the tokens of one answer are not "
        "independent), over the record's prompts; the per-token SE is `<name>_se_token` in "
        "summary.csv. `scored tokens` is the exact answers' length (per record): at most prompts x "
        "max_new_tokens.",
        unit="prompt",
    )
    # The warning goes right under the title, before the figures it qualifies.
    return [*lines[:2], *_few_scored_tokens(rows), *lines[2:]]


def _what_this_shows(findings: list[str]) -> list[str]:
    """A section's closing paragraph: findings computed from its table, one bullet each."""
    return ["**What this shows.**", "", *findings, ""]


def _perplexity_rows(table: pd.DataFrame, per_layer: bool = False) -> pd.DataFrame:
    """Perplexity records of cache settings (whole model), or with ``per_layer`` those of the
    per-layer sensitivity (one layer quantized)."""
    rows = table[table["workload"] == "perplexity"]
    one_layer = _column(rows, "quantized_layers").notna()
    return rows[one_layer] if per_layer else rows[~one_layer]


def _setting(row: pd.Series) -> str:
    """A cache setting in words for the findings: "K mse 3 / V mse 3", with any exact residual
    window or exact layers."""
    text = f"K {_strategy(row, 'key')} / V {_strategy(row, 'value')}"
    if pd.notna(row.get("residual_length")) and row["residual_length"] > 0:
        text += f", last {_format(row['residual_length'])} tokens exact"
    if pd.notna(row.get("exact_layers")) and row["exact_layers"] != "none":
        text += f", layers {row['exact_layers']} exact"
    if not _missing(row.get("setting")):
        text = f"{row['setting']} ({text})"
    return text


_PERPLEXITY_HEADERS = {
    "model": "model",
    "setting": "setting",
    "protocol": "protocol",
    "keys": "keys",
    "values": "values",
    "residual_length": "residual",
    "exact_layers": "exact layers",
    "exact_perplexity": "ppl exact",
    "quantized_perplexity": "ppl quantized",
    "perplexity_ratio": "ratio",
    "kl_divergence": "KL",
    "kl_divergence_median": "KL median",
    "kl_divergence_p99": "KL p99",
    "kl_divergence_max": "KL max",
    "top1_agreement": "top-1",
    "delta_p_mean": "Δp mean",
    "delta_p_rms": "Δp RMS",
    "kv_compression_ratio": "KV compression",
    "scored_tokens": "scored tokens",
    "records": "records",
}
# The perplexity metrics shown as "value ± SE" where the records have an SE.
_WITH_ERRORS = ("perplexity_ratio", "kl_divergence", "top1_agreement", "delta_p_mean", "delta_p_rms")


def _section_perplexity(table: pd.DataFrame, windows: _WindowValues) -> list[str]:
    rows = _perplexity_rows(table)
    lines = ["## 3. Perplexity and KV memory vs bits (real text)", ""]
    if rows.empty:
        return [*lines, "No perplexity records: section omitted.", ""]
    keys = [
        "model",
        "setting",
        "protocol",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "bits",
        "group_size",
        *_LINE_SETTINGS,
        *WINDOW_SET,
    ]
    metrics = [
        "exact_perplexity",
        "quantized_perplexity",
        "perplexity_ratio",
        "kl_divergence",
        "kl_divergence_median",
        "kl_divergence_p99",
        "kl_divergence_max",
        "top1_agreement",
        "delta_p_mean",
        "delta_p_rms",
        "kv_compression_ratio",
        "scored_tokens",
    ]
    means = _decode_first(_mean_by(rows, keys, metrics))
    several = means.groupby("model")[list(WINDOW_SET)].nunique(dropna=False).gt(1).any(axis=None)
    findings = [
        f"- {_format(model)}, {_protocol_label(protocol)}"
        + (f", {_window_sets(group, windows)}" if several else "")
        + f": perplexity ratio (best first): {_ranking(group, _setting, windows)}."
        for (model, protocol, *_), group in means.groupby(
            ["model", "protocol", *WINDOW_SET], dropna=False, sort=False
        )
    ]
    means = means.assign(protocol=means["protocol"].map(_protocol_label))
    means = _with_errors(_with_cache_labels(means), _WITH_ERRORS)
    return [
        *lines,
        "Cross-entropy of real text with the exact and the quantized cache (see the protocols in "
        "the notes below; the decode protocol leads). KL(exact || quantized) per scored token in "
        "nats, its median, 99th percentile and maximum; Δp is p_quantized - p_exact of the text's "
        "next token (mean and RMS over the scored tokens).",
        "",
        _text_note(rows, windows),
        "",
        "The figures of quality against stored bits, one per model, are in the cross-model section above.",
        "",
        markdown_table(
            means,
            {
                name: header
                for name, header in (
                    ({"sample_seed": "seed"} if several else {}) | _PERPLEXITY_HEADERS
                ).items()
                if name != "setting" or means["setting"].notna().any()
            },
        ),
        "",
        *_what_this_shows(findings),
    ]


# ------------------------------------------------------------------------- across models

# The quality a cross-model row shows, with their standard errors.
_ACROSS_METRICS = ("perplexity_ratio", "kl_divergence", "kv_compression_ratio")
# A key layer whose mean vector holds at least this share of the keys' energy is "offset-dominated".
OFFSET_SHARE = 0.9
_FAMILY_STYLES = {  # family -> (colour, marker)
    "TurboQuant": ("tab:blue", "o"),
    "TurboQuant + fix": ("tab:green", "D"),
    "vLLM preset": ("tab:purple", "s"),
    "baseline": ("tab:orange", "^"),
}


def figure_name_of_model(model: str) -> str:
    """The file stem of a model's quality-vs-stored-bits figure: ``perplexity-<model>``."""
    return f"perplexity-{model}"


def _setting_label(row: pd.Series) -> str:
    """A row's short name: the sweep's label of its setting, else its strategies in words."""
    return str(row["setting"]) if not _missing(row.get("setting")) else _setting(row)


def _family(row: pd.Series) -> str:
    """Which kind of cache a row is, for the colours of the cross-model plots."""
    if str(_setting_label(row)).startswith("vllm-"):
        return "vLLM preset"
    strategies = {row["key_strategy"], row["value_strategy"]}
    if strategies & set(BASELINE_STRATEGIES):
        return "baseline"
    fixed = (
        not strategies <= {"mse", "prod", "exact"}
        or (not _missing(row.get("center_keys")) and bool(row["center_keys"]))
        or (not _missing(row.get("exact_layers")) and row["exact_layers"] != "none")
        or max(row["key_bits"], row["value_bits"]) >= 8
    )
    return "TurboQuant + fix" if fixed else "TurboQuant"


def _across_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, setting) of the whole-model perplexity records (decode protocol first:
    the leading one), with ``stored_bits``: every stored bit per cached coordinate (codes, norms,
    scales, zero points, means, and the fp32 tokens of exact layers or windows), 32 / the KV
    compression."""
    rows = _perplexity_rows(table)
    if rows.empty:
        return rows
    protocol = "decode" if (rows["protocol"] == "decode").any() else rows["protocol"].dropna().iloc[0]
    rows = rows[rows["protocol"] == protocol]
    keys = [name for name in WINDOW_SETTINGS if name in rows.columns]
    means = _mean_by(rows, keys, list(_ACROSS_METRICS))
    means = means.assign(
        label=[_setting_label(row) for _, row in means.iterrows()],
        family=[_family(row) for _, row in means.iterrows()],
        stored_bits=32.0 / means["kv_compression_ratio"],
    )
    return means


def _frontier(rows: pd.DataFrame) -> pd.DataFrame:
    """The settings no other beats at their budget: each has a lower perplexity ratio than every
    setting that stores as many bits or fewer (the best measured setting at each budget)."""
    ordered = rows.dropna(subset=["stored_bits", "perplexity_ratio"]).sort_values(
        ["stored_bits", "perplexity_ratio"], kind="stable"
    )
    best, keep = math.inf, []
    for index, row in ordered.iterrows():
        if row["perplexity_ratio"] < best:
            best = row["perplexity_ratio"]
            keep.append(index)
    return ordered.loc[keep]


def _plain_log_y(axis: Any) -> None:
    """A log y axis labelled in plain numbers (2, 5, 10, not 10^0.3)."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _: Any) -> str:  # 2 and 5 of each decade only
        mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
        return f"{value:g}" if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""

    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(FuncFormatter(minor))
    axis.tick_params(axis="y", which="minor", labelsize=7)


def _plot_model_quality(rows: pd.DataFrame, model: str, path: Path) -> None:
    """Perplexity ratio and KL against stored bits for one model: one point per setting, coloured
    by family, 95% interval bars, the best setting at each budget joined and named."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13.0, 5.0))
    axes = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.8, bottom=0.12, top=0.86, wspace=0.3)
    best = _frontier(rows)
    for axis, metric, ylabel in (
        (axes[0], "perplexity_ratio", "perplexity ratio (quantized / exact)"),
        (axes[1], "kl_divergence", "KL(exact || quantized), nats per token"),
    ):
        for family, (colour, marker) in _FAMILY_STYLES.items():
            group = rows[(rows["family"] == family) & rows[metric].notna() & (rows[metric] > 0)]
            if group.empty:
                continue
            half = _half_width(group, metric)
            axis.errorbar(
                group["stored_bits"], group[metric], yerr=half, fmt=marker, color=colour, capsize=3,
                markersize=6, linestyle="none", label=family,
            )  # fmt: skip
        shown = best[best[metric].notna() & (best[metric] > 0)]
        axis.step(
            shown["stored_bits"], shown[metric], where="post", color="0.3", linewidth=1, linestyle=":",
            label="best ratio at each budget",
        )  # fmt: skip
        axis.scatter(shown["stored_bits"], shown[metric], s=150, facecolors="none", edgecolors="k", zorder=3)
        for number, (_, row) in enumerate(shown.iterrows(), start=1):  # numbered, named beside the legend
            axis.annotate(
                str(number), (row["stored_bits"], row[metric]), xytext=(7, 4), textcoords="offset points",
                fontsize=8, fontweight="bold",
            )  # fmt: skip
        if metric == "perplexity_ratio":
            axis.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
        _plain_log_y(axis)
        axis.margins(x=0.15)  # room for the numbers of the end points
        axis.set_xlabel("stored bits per coordinate (codes, norms, scales, exact layers)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    axes[0].set_title("perplexity ratio (dashed: exact cache)", fontsize=10)
    axes[1].set_title("KL divergence (circled: the best ratios, left)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.81, 0.55), fontsize=8, frameon=False)
    names = [f"{number}  {label}" for number, label in enumerate(best["label"], start=1)]
    figure.text(0.815, 0.5, "best ratio at each budget:\n" + "\n".join(names), fontsize=8, va="top")
    figure.suptitle(f"{model}: quality against stored bits ({BARS_NOTE}, window as the unit)", fontsize=11)
    _save(figure, path)


def _across_table(rows: pd.DataFrame, models: Sequence[str]) -> str:
    """One row per setting, a column group per model: ratio ± SE, KL ± SE, stored bits."""
    order = (
        rows.assign(first=rows["model"] == models[0])
        .sort_values(["first", "stored_bits"], ascending=[False, True], kind="stable")["label"]
        .drop_duplicates()
    )
    headers = ["setting"]
    for model in models:
        headers += [f"{model} ratio", f"{model} KL", f"{model} bits"]
    lines = ["| " + " | ".join(_format(header) for header in headers) + " |", "|" + "---|" * len(headers)]
    for label in order:
        cells = [_format(label)]
        for model in models:
            found = rows[(rows["model"] == model) & (rows["label"] == label)]
            if found.empty:
                cells += ["-", "-", "-"]
                continue
            row = found.iloc[0]
            cells += [
                _pm(row["perplexity_ratio"], _se(row, "perplexity_ratio")),
                _pm(row["kl_divergence"], _se(row, "kl_divergence")),
                "-" if _missing(row["stored_bits"]) else f"{row['stored_bits']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _across_findings(rows: pd.DataFrame, models: Sequence[str], windows: _WindowValues) -> list[str]:
    """What holds on every model and what does not, by each setting's own interval against exact
    (:func:`_against_exact`); what centring the keys changes, by paired per-window differences;
    and the best measured setting at each budget."""
    findings = []
    verdicts: dict[str, dict[str, bool | None]] = {}
    for _, row in rows.iterrows():
        verdicts.setdefault(row["label"], {})[row["model"]] = _against_exact(row)
    on_all = {label: v for label, v in verdicts.items() if set(models) <= set(v) and None not in v.values()}
    if len(models) > 1 and on_all:
        groups = {
            "not distinguishable from the exact cache on every model": [
                label for label, v in on_all.items() if not any(v.values())
            ],
            "worse than the exact cache on every model": [
                label for label, v in on_all.items() if all(v.values())
            ],
        }
        for model in models:
            groups[f"not distinguishable from exact on {model} only"] = [
                label for label, v in on_all.items() if not v[model] and sum(not x for x in v.values()) == 1
            ]
        for what, labels in groups.items():
            if labels:
                findings.append(f"- {what[0].upper()}{what[1:]}: {', '.join(labels)}.")
    for model in models:
        mine = rows[rows["model"] == model]
        for _, row in mine.iterrows():
            label = row["label"]
            if not label.endswith("-kc"):
                continue
            base = mine[mine["label"] == label[: -len("-kc")]]
            if base.empty:
                continue
            base = base.iloc[0]
            paired = paired_nll(windows.of(row), windows.of(base))
            ratio = "perplexity_ratio"
            change = f"{_pm(base[ratio], _se(base, ratio))} -> {_pm(row[ratio], _se(row, ratio))}"
            if paired is None:
                verdict = "not tested (no per-window values)"
            else:
                size = f"({paired.mean:+.3f} ± {paired.se:.3f} nats)"
                if not paired.different:
                    verdict = f"not distinguishable by its paired per-window difference {size}"
                else:
                    direction = "lower" if paired.mean < 0 else "higher"
                    verdict = f"{direction} by its paired per-window difference {size}"
            findings.append(f"- {model}: centring the keys of {base['label']}: ratio {change}, {verdict}.")
        best = _frontier(mine)
        if len(best):
            ratio = "perplexity_ratio"
            steps = "; ".join(
                f"{row['stored_bits']:.2f} bits: {row['label']} {_pm(row[ratio], _se(row, ratio))}"
                for _, row in best.iterrows()
            )
            findings.append(
                f"- {model}: the lowest measured ratio at each budget (stored bits per coordinate; "
                f"neighbours may not be distinguishable, see the paired tests above): {steps}."
            )
    return findings


def _key_stats_rows(key_stats: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, layer) of the key statistics records (tq.tasks.key_stats)."""
    rows = [
        {
            "model": record["model"],
            "layer": layer["layer"],
            "key_share": layer["key"]["mean_energy_share"],
            "key_rms_ratio": layer["key"]["channel_rms_ratio"],
            "key_norm": layer["key"]["mean_norm"],
            "value_share": layer["value"]["mean_energy_share"],
        }
        for record in key_stats
        for layer in record["layers"]
    ]
    return pd.DataFrame.from_records(
        rows, columns=["model", "layer", "key_share", "key_rms_ratio", "key_norm", "value_share"]
    ).astype({"key_share": float, "key_rms_ratio": float, "key_norm": float, "value_share": float})


def _plot_key_stats(stats: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(12.0, 4.4))
    axes = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.8, bottom=0.13, top=0.86, wspace=0.28)
    for model, group in stats.groupby("model", sort=False):
        axes[0].plot(group["layer"], group["key_share"], marker="o", markersize=4, label=str(model))
        axes[1].plot(group["layer"], group["key_rms_ratio"], marker="o", markersize=4, label=str(model))
    axes[0].axhline(OFFSET_SHARE, color="k", linewidth=0.8, linestyle="--")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_title(f"share of the keys' energy in their mean (dashed: {OFFSET_SHARE})", fontsize=10)
    axes[0].set_ylabel("share")
    _plain_log_y(axes[1])
    axes[1].set_title("largest / median channel RMS of the keys", fontsize=10)
    axes[1].set_ylabel("ratio")
    for axis in axes:
        axis.set_xlabel("layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.81, 0.5), fontsize=8, frameon=False)
    _save(figure, path)


def _key_stats_lines(key_stats: Sequence[dict[str, Any]], out_dir: Path) -> list[str]:
    stats = _key_stats_rows(key_stats)
    if stats.empty:
        return []
    _plot_key_stats(stats, out_dir / "key_statistics.png")
    lines = [
        "### Why: the keys per layer",
        "",
        "Per layer, over every token of "
        + ", ".join(
            f"{record['model']} ({record['windows']} windows x {record['window']} tokens)"
            for record in key_stats
        )
        + ": the share of the cached keys' energy that is their per-head mean vector (tq.tasks.key_stats), "
        "and how far the largest channel's RMS stands above the median channel's. TurboQuant "
        "quantizes each key's direction after a rotation; where nearly all of every key is one "
        "shared offset, the part that tells tokens apart is a small residual its error swamps "
        "(key mean-centring subtracts the offset first).",
        "",
        "![key statistics](key_statistics.png)",
        "",
        "| model | layers | key share median | key share max (layer) | layers with share >= "
        f"{OFFSET_SHARE} | channel RMS ratio max (layer) | value share median |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, group in stats.groupby("model", sort=False):
        top = group.loc[group["key_share"].idxmax()]
        peak = group.loc[group["key_rms_ratio"].idxmax()]
        heavy = group[group["key_share"] >= OFFSET_SHARE]
        lines.append(
            f"| {model} | {len(group)} | {group['key_share'].median():.3f} | {top['key_share']:.3f} "
            f"({int(top['layer'])}) | "
            + (
                ", ".join(
                    f"{int(layer)} ({share:.3f})" for layer, share in heavy[["layer", "key_share"]].values
                )
                or "none"
            )
            + f" | {peak['key_rms_ratio']:.1f} ({int(peak['layer'])}) | {group['value_share'].median():.3f} |"
        )
    return [*lines, ""]


def _section_across_models(
    table: pd.DataFrame, out_dir: Path, windows: _WindowValues, key_stats: Sequence[dict[str, Any]]
) -> list[str]:
    lines = ["## Across models: where TurboQuant breaks, and which fix holds", ""]
    rows = _across_rows(table)
    if rows.empty:
        return [*lines, "No perplexity records: section omitted.", ""]
    models = list(dict.fromkeys(rows["model"]))
    for model in models:
        _plot_model_quality(
            rows[rows["model"] == model], model, out_dir / f"{figure_name_of_model(model)}.png"
        )
    return [
        *lines,
        "Each cache setting of the sweep on each model: perplexity ratio (quantized / exact) and "
        "KL(exact || quantized) per scored token, ± one standard error with the window as the unit, "
        "and the bits stored per cached coordinate: codes plus every norm, scale, zero point, key "
        "mean and exact token (32 / the KV compression, measured on the context's cache).",
        "",
        _across_table(rows, models),
        "",
        *(f"![{model}]({figure_name_of_model(model)}.png)\n" for model in models),
        *_key_stats_lines(key_stats, out_dir),
        *_what_this_shows(_across_findings(rows, models, windows)),
    ]


def _section_throughput(table: pd.DataFrame, out_dir: Path) -> list[str]:
    lines = ["## 4. Throughput", ""]
    rows = _synthetic(table)
    if rows.empty:
        lines += ["No synthetic records: quantizer throughput omitted.", ""]
    else:
        speeds = [
            "timing.quantize_vectors_per_s",
            "timing.dequantize_vectors_per_s",
            "timing.inner_product_pairs_per_s",
        ]
        means = _mean_by(rows, ["dim", "strategy", "kernels", "bits"], speeds)
        figure, axes = _figure(2)
        for axis, name, title in zip(axes, speeds[:2], ("quantize", "dequantize"), strict=True):
            _plot_lines(
                axis,
                means,
                ["dim", "strategy", "kernels"],
                name,
                lambda row: f"d={_format(row['dim'])} {row['strategy']} ({row['kernels']})",
            )
            _finish(axis, f"{title} (median, vectors/s)", "vectors / s", means["bits"], log=True)
        _save(figure, out_dir / "throughput.png")
        headers = {
            "dim": "d",
            "strategy": "strategy",
            "kernels": "kernels",
            "bits": "bits",
            "timing.quantize_vectors_per_s": "quantize vec/s",
            "timing.dequantize_vectors_per_s": "dequantize vec/s",
            "timing.inner_product_pairs_per_s": "inner products pairs/s",
            "records": "records",
        }
        lines += [
            "Quantizer speed on random unit vectors (median of repeats after a warm-up).",
            "",
            "![throughput](throughput.png)",
            "",
            markdown_table(means, headers),
            "",
        ]
    real = table[table["workload"] == "real-model"]
    if real.empty:
        return [*lines, "No real-model records: decode speed omitted.", ""]
    keys = [
        "model",
        "setting",
        "mode",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "residual_length",
        "exact_layers",
        "group_size",
        "threads",
    ]
    speeds = [
        "timing.exact.decode_tokens_per_s",
        "timing.quantized.decode_tokens_per_s",
        "timing.exact.prefill_seconds_mean",
        "timing.quantized.prefill_seconds_mean",
    ]
    means = _mean_by(real, keys, speeds)
    means = means.assign(
        cache=[
            "-"
            if pd.isna(row["key_strategy"])
            else f"K {_strategy(row, 'key')} / V {_strategy(row, 'value')}"
            for _, row in means.iterrows()
        ]
    )
    headers = {
        "model": "model",
        "mode": "mode",
        "cache": "cache",
        "threads": "threads",
        "timing.exact.decode_tokens_per_s": "exact tok/s",
        "timing.quantized.decode_tokens_per_s": "quantized tok/s",
        "timing.exact.prefill_seconds_mean": "exact prefill s",
        "timing.quantized.prefill_seconds_mean": "quantized prefill s",
        "records": "records",
    }
    return [
        *lines,
        "Real-model decode speed (ONNX Runtime float attention over the reconstruction; see the notes).",
        "",
        markdown_table(means, headers),
        "",
    ]


def _layer_findings(line: pd.DataFrame) -> str:
    """What the per-layer runs of one model show: the range of the ratios and how many layers,
    and which, differ from exact by their own per-window difference (:func:`_against_exact`), or
    that none does."""
    ratio = "perplexity_ratio"
    tested = line[[_against_exact(row) is not None for _, row in line.iterrows()]]
    differing = [
        f"layer {int(row['quantized_layer'])} ({_pm(row[ratio], _se(row, ratio))}, "
        f"KL {_pm(row['kl_divergence'], _se(row, 'kl_divergence'))})"
        for _, row in tested.iterrows()
        if _against_exact(row)
    ]
    if differing:
        verdict = (
            f"{len(differing)} of {len(tested)} layers differ from exact beyond the 95% interval of "
            f"their per-window quantized - exact NLL difference on {_units(tested)}: " + ", ".join(differing)
        )
    else:
        why = f"not distinguishable on {_units(tested)}"
        if tested.empty:
            why = "not tested, no standard error recorded"
        verdict = f"no layer's ratio is shown to differ from 1.0 (exact): {why}"
    ratios = line[ratio]
    return (
        f"- {_format(line['model'].iloc[0])} ({_setting(line.iloc[0])}, {len(line)} layers): ratios "
        f"{ratios.min():.3f} to {ratios.max():.3f}; {verdict}."
    )


def _section_layer_sensitivity(table: pd.DataFrame, out_dir: Path, windows: _WindowValues) -> list[str]:
    rows = _perplexity_rows(table, per_layer=True)
    lines = ["## 5. Per-layer sensitivity (one layer quantized at a time)", ""]
    if rows.empty:
        return [*lines, "No per-layer sensitivity records: section omitted.", ""]
    rows = rows.assign(quantized_layer=pd.to_numeric(rows["quantized_layers"].astype(str)))
    groups = ["model", "protocol", "key_strategy", "value_strategy", "key_bits", "value_bits", *WINDOW_SET]
    metrics = ["perplexity_ratio", "kl_divergence", "top1_agreement", "scored_tokens"]
    means = _decode_first(_mean_by(rows, [*groups, "workload", "quantized_layer"], metrics))
    figure, axes = _figure(1)
    bars = _plot_lines(
        axes[0],
        means.assign(protocol=means["protocol"].map(_protocol_label)),
        ["model", "protocol"],
        "perplexity_ratio",
        lambda row: f"{_format(row['model'])} ({row['protocol']})",
        x="quantized_layer",
    )
    axes[0].axhline(1.0, color="k", linestyle="--", linewidth=1)
    axes[0].set_title(_title("perplexity ratio with only this layer quantized", bars, "window"), fontsize=10)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("ratio quantized / exact")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(figure, out_dir / "layer_sensitivity.png")
    findings = [_layer_findings(line) for _, line in means.groupby(groups, dropna=False, sort=False)]
    means = _with_errors(
        _with_cache_labels(means.assign(protocol=means["protocol"].map(_protocol_label))),
        ["perplexity_ratio", "kl_divergence", "top1_agreement"],
    )
    headers = {
        "model": "model",
        "protocol": "protocol",
        "quantized_layer": "layer",
        "keys": "keys",
        "values": "values",
        "perplexity_ratio": "ppl ratio",
        "kl_divergence": "KL",
        "top1_agreement": "top-1",
        "scored_tokens": "scored tokens",
    }
    return [
        *lines,
        "Perplexity with the cache setting applied to one layer and every other layer exact "
        "(short windows: the per-layer differences are paired on the same text). Layers whose "
        "ratio stands out beyond its 95% interval are candidates for `exact_first_layers` / "
        "`exact_last_layers`. The windows: "
        f"{_window_sets(rows, windows)}; ± is one standard error with the window as the unit, and "
        "a layer differs from exact when the 95% interval of its per-window quantized - exact NLL "
        "difference excludes 0 (section 3).",
        "",
        "![per-layer sensitivity](layer_sensitivity.png)",
        "",
        markdown_table(means, headers),
        "",
        *_what_this_shows(findings),
    ]


METHOD_NAMES = {
    "mse": "TurboQuant MSE",
    "prod": "TurboQuant Prod",
    "kivi": "KIVI-style",
    "uniform": "uniform",
    "rotated-uniform": "rotation + uniform",
    "fp8": "FP8 E4M3",
}


def _method(row: pd.Series) -> str:
    """The quantization method of a cache setting: "TurboQuant MSE", "KIVI-style", or for mixed
    streams "TurboQuant Prod keys + TurboQuant MSE values"."""
    keys, values = row["key_strategy"], row["value_strategy"]
    if keys == values:
        return METHOD_NAMES.get(keys, str(keys))
    return f"{METHOD_NAMES.get(keys, keys)} keys + {METHOD_NAMES.get(values, values)} values"


def _is_ablation(row: pd.Series) -> bool:
    """A setting that keeps part of the cache exact: a stream, a residual window or layers."""
    return bool(
        "exact" in (row["key_strategy"], row["value_strategy"])
        or (pd.notna(row["residual_length"]) and row["residual_length"] > 0)
        or (pd.notna(row["exact_layers"]) and row["exact_layers"] != "none")
    )


def _real_quality(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, perplexity protocol and cache setting (decode protocol first): perplexity ratio,
    KL, scored tokens and stored bits from the perplexity records, top-1 agreement from compare
    mode (teacher-forced, joined to every protocol and window set of the same setting); standard
    errors where the records have them."""
    keys = [
        "model",
        "setting",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "bits",
        "residual_length",
        "exact_layers",
        "group_size",
    ]
    perplexity = _mean_by(
        _perplexity_rows(table),
        [*keys, "protocol", *WINDOW_SET],
        ["perplexity_ratio", "kl_divergence", "kv_compression_ratio", "scored_tokens"],
    )
    compare = table[(table["workload"] == "real-model") & (table["mode"] == "compare")]
    top1 = _mean_by(compare, keys, ["top1_agreement"]).drop(columns="records")
    merged = perplexity.drop(columns="records").merge(top1, on=keys, how="outer")
    merged["stored_bits"] = 32.0 / merged["kv_compression_ratio"]
    merged["method"] = merged.apply(_method, axis=1)
    merged["ablation"] = merged.apply(_is_ablation, axis=1)
    return _decode_first(merged)


_QUALITY_HEADERS = {
    "protocol": "protocol",
    "perplexity_ratio": "ppl ratio",
    "top1_agreement": "top-1 (compare)",
    "kl_divergence": "KL (ppl text)",
    "stored_bits": "stored bits/coord",
}


def _shown_quality(quality: pd.DataFrame) -> pd.DataFrame:
    """Rows of :func:`_real_quality` as the tables show them: "value ± SE", protocols named."""
    quality = quality.assign(protocol=quality["protocol"].map(_protocol_label))
    return _with_errors(quality, ["perplexity_ratio", "top1_agreement", "kl_divergence"])


def _section_baselines(quality: pd.DataFrame, windows: _WindowValues) -> list[str]:
    """``quality``: :func:`_real_quality` of the records."""
    lines = ["## 6. Compared to what: baselines at equal bits", ""]
    quality = quality[~quality["ablation"]]
    if quality.empty or quality["method"].nunique() < 2:
        return [*lines, "Fewer than two quantization methods in the records: section omitted.", ""]
    quality = _decode_first(quality.sort_values(["model", "bits", "perplexity_ratio"], na_position="last"))
    headers = {"model": "model", "bits": "code bits", "method": "method", **_QUALITY_HEADERS}
    findings = []
    by = ["model", "protocol", "bits", *WINDOW_SET]
    for (model, protocol, bits, *_), group in quality.groupby(by, dropna=False, sort=False):
        ranked = group.dropna(subset=["perplexity_ratio"])
        if ranked["method"].nunique() < 2:
            continue
        order = _ranking(
            ranked, lambda row: f"{row['method']} ({row['stored_bits']:.2f} stored bits)", windows
        )
        findings.append(
            f"- {_format(model)}, {_protocol_label(protocol)}, {_format(bits)} code bits, perplexity "
            f"ratio (best first): {order}."
        )
    return [
        *lines,
        "TurboQuant against the baselines on the same model, prompts and text. `code bits` are the "
        "bits of codes per coordinate; `stored bits/coord` count everything stored (norms, scales, "
        "zero points, outlier channel indices) over the context's fp32 size, as 32 / KV compression. "
        "Perplexity contexts are long (the `perplexity` config); compare-mode prompts are mostly "
        "short, and KIVI-style keeps up to `group_size` - 1 recent keys exact, so on short prompts "
        "its top-1 mostly measures exact keys: the perplexity columns are the fairer comparison. "
        "In a ranking, `<` separates settings whose paired per-window difference lies beyond its 95% "
        "interval (section 3); `≈` joins settings the records cannot tell apart.",
        "",
        markdown_table(_shown_quality(quality), headers),
        "",
        *_what_this_shows(findings or ["- No bit width has two methods measured on the same model."]),
    ]


def _same_window_set(table: pd.DataFrame, row: pd.Series) -> pd.Series:
    """Which rows of ``table`` were scored on the window set of ``row`` (:data:`WINDOW_SET`)."""
    same = pd.Series(True, index=table.index)
    for name in WINDOW_SET:
        column = _column(table, name)
        same &= column.isna() if _missing(row.get(name)) else column.eq(row.get(name)).fillna(False)
    return same.astype(bool)


def _ablation_what(row: pd.Series) -> tuple[str, set[str], set[float]]:
    """What an ablation keeps exact, in words, with the strategies and widths it quantizes with."""
    parts = [
        ("keys", row["key_strategy"], row["key_bits"]),
        ("values", row["value_strategy"], row["value_bits"]),
    ]
    quantized = [(name, strategy, bits) for name, strategy, bits in parts if strategy != "exact"]
    what = []
    if len(quantized) == 1:
        what.append(f"only {quantized[0][0]} quantized")
    if pd.notna(row["residual_length"]) and row["residual_length"] > 0:
        what.append(f"last {_format(row['residual_length'])} tokens exact")
    if pd.notna(row["exact_layers"]) and row["exact_layers"] != "none":
        what.append(f"layers {row['exact_layers']} exact")
    return ", ".join(what), {strategy for _, strategy, _ in quantized}, {bits for _, _, bits in quantized}


def _against_whole_cache(row: pd.Series, reference: pd.DataFrame, windows: _WindowValues) -> str:
    """An ablation's ratio against the same quantizer on the whole cache (one reference row), with
    whether their paired per-window difference tells them apart (:func:`paired_nll`); empty
    without a reference."""
    ratio = "perplexity_ratio"
    if len(reference) != 1 or pd.isna(reference[ratio].iloc[0]):
        return ""
    other = reference.iloc[0]
    found = [windows.of(row), windows.of(other)]
    paired = paired_nll(*found)
    if paired is not None and paired.different:
        verdict = "lower" if paired.mean < 0 else "higher"
    else:
        verdict = _not_distinguishable(found)
    return (
        f" vs {_pm(other[ratio], _se(other, ratio))} with the whole cache quantized "
        f"({other['stored_bits']:.2f} stored bits): {verdict}"
    )


def _section_ablations(quality: pd.DataFrame, windows: _WindowValues) -> list[str]:
    """``quality``: :func:`_real_quality` of the records."""
    lines = ["## 7. Ablations: what stays exact", ""]
    ablations = quality[quality["ablation"]]
    if ablations.empty:
        return [*lines, "No ablation settings in the records: section omitted.", ""]
    plain = quality[~quality["ablation"]]
    findings = []
    for _, row in ablations.dropna(subset=["perplexity_ratio"]).iterrows():
        what, strategies, widths = _ablation_what(row)
        reference = plain[
            (plain["model"] == row["model"])
            & plain["protocol"].eq(row["protocol"]).fillna(False).astype(bool)
            & plain["key_strategy"].isin(strategies)
            & plain["value_strategy"].isin(strategies)
            & plain["key_bits"].isin(widths)
            & plain["value_bits"].isin(widths)
            & _same_window_set(plain, row)
        ]
        findings.append(
            f"- {_format(row['model'])}, {_protocol_label(row['protocol'])}, {what} ({_method(row)} at "
            f"{'/'.join(_format(b) for b in sorted(widths))} bits): perplexity ratio "
            f"{_pm(row['perplexity_ratio'], _se(row, 'perplexity_ratio'))} at {row['stored_bits']:.2f} "
            f"stored bits{_against_whole_cache(row, reference, windows)}."
        )
    headers = {
        "model": "model",
        "keys": "keys",
        "values": "values",
        "residual_length": "residual",
        "exact_layers": "exact layers",
        **_QUALITY_HEADERS,
    }
    return [
        *lines,
        "Settings that keep part of the cache exact: keys-only or values-only quantization, a "
        "residual window of recent exact tokens, or exact first and last layers (config: `kv_caches` "
        "entries with an `exact` strategy, `residual_length`, `exact_first_layers`, "
        "`exact_last_layers`). Lower or higher means the paired per-window difference lies beyond its "
        "95% interval (section 3).",
        "",
        markdown_table(_shown_quality(_with_cache_labels(ablations)), headers),
        "",
        *_what_this_shows(findings or ["- No ablation setting has a perplexity measurement."]),
    ]


def _binomial_se(rate: pd.Series, trials: pd.Series) -> pd.Series:
    """The standard error of a rate over n trials, sqrt(p (1 - p) / n)."""
    return np.sqrt(rate * (1.0 - rate) / trials)


def _with_needle_errors(rows: pd.DataFrame, rates: list[str], lengths: list[int]) -> pd.DataFrame:
    """Needle records with a binomial ``<rate>_se`` for each rate: a per-length rate over that
    length's trials (``by_length.<n>.trials``), an overall one over all of them."""
    counts = rows.reindex(columns=[f"by_length.{length}.trials" for length in lengths])
    total = counts.sum(axis=1, min_count=1)
    pattern = re.compile(r"^by_length\.(\d+)\.")
    errors = {}
    for rate in rates:
        match = pattern.match(rate)
        trials = _column(rows, f"by_length.{match.group(1)}.trials") if match else total
        errors[f"{rate}_se"] = _binomial_se(_column(rows, rate), trials)
    return rows.assign(**errors)


def _section_needle(table: pd.DataFrame, out_dir: Path) -> list[str]:
    rows = table[table["workload"] == "needle"]
    lines = ["## 8. Needle in a haystack", ""]
    if rows.empty:
        return [*lines, "No needle records: section omitted.", ""]
    pattern = re.compile(r"^by_length\.(\d+)\.(exact|quantized)_retrieval$")
    by_length = sorted({int(m.group(1)) for c in rows.columns if (m := pattern.match(c))})
    per_length = [
        f"by_length.{length}.{side}_retrieval" for length in by_length for side in ("exact", "quantized")
    ]
    rates = ["exact_retrieval", "quantized_retrieval", "answer_agreement", *per_length]
    rows = _with_needle_errors(rows, rates, by_length)
    means = _mean_by(rows, ["model", "key_strategy", "key_bits", "bits"], [*rates, "kv_compression_ratio"])
    figure, axes = _figure(1)
    bars = False
    for length in by_length:
        column = f"by_length.{length}.quantized_retrieval"
        for model, line in means.groupby("model", sort=True):
            half_width = _half_width(line, column)
            bars = bars or half_width is not None
            label = f"{_format(model)} {length} tokens"
            color = _draw(axes[0], line["bits"], line[column], half_width, label)
            exact = line[f"by_length.{length}.exact_retrieval"].mean()
            axes[0].axhline(exact, linestyle="--", linewidth=1, color=color)
    _finish(axes[0], "needle retrieval (dashed: exact cache)", "retrieval rate", means["bits"], bars=bars)
    _save(figure, out_dir / "needle.png")
    headers = {
        "model": "model",
        "bits": "bits",
        "exact_retrieval": "exact",
        "quantized_retrieval": "quantized",
        "answer_agreement": "same answer",
        "kv_compression_ratio": "KV compression",
    }
    for length in by_length:
        headers[f"by_length.{length}.quantized_retrieval"] = f"quantized @{length}"
    findings = [
        f"- {_format(row['model'])}, {_format(row['bits'])} bits: retrieved "
        f"{_pm(row['quantized_retrieval'], _se(row, 'quantized_retrieval'), percent=True)} of the needles "
        f"vs {_pm(row['exact_retrieval'], _se(row, 'exact_retrieval'), percent=True)} with the exact "
        f"cache; identical answers in "
        f"{_pm(row['answer_agreement'], _se(row, 'answer_agreement'), percent=True)} of the prompts."
        for _, row in means.iterrows()
    ]
    return [
        *lines,
        "A number hidden at several depths of Wikipedia filler, asked for after it, answered greedily "
        "with the exact cache and with a TurboQuant MSE cache (the whole haystack goes through the "
        "quantized cache). A needle counts as retrieved when its number appears in the answer. "
        "± is the binomial standard error of a rate over its trials, sqrt(p (1 - p) / n).",
        "",
        "![needle](needle.png)",
        "",
        markdown_table(_with_errors(means, rates), headers),
        "",
        *_what_this_shows(findings),
    ]


def _headline_findings(means: pd.DataFrame) -> list[str]:
    """Per model and measure, how many settings have a perplexity ratio not distinguishable from
    1.0 (exact) by their own paired difference with the window or prompt as the unit
    (:func:`_against_exact`), and which."""
    findings = []
    ratio = "perplexity_ratio"
    for (model, measure), group in means.groupby(["model", "measure"], dropna=False, sort=False):
        if group[ratio].isna().all():
            continue
        tested = group[[_against_exact(row) is not None for _, row in group.iterrows()]]
        if tested.empty:
            findings.append(f"- {_format(model)}, {measure}: no standard errors recorded, nothing tested.")
            continue
        exact_like = [
            f"{_setting(row)} ({_pm(row[ratio], _se(row, ratio))})"
            for _, row in tested.iterrows()
            if not _against_exact(row)
        ]
        findings.append(
            f"- {_format(model)}, {measure}: {len(exact_like)} of {len(tested)} settings have a perplexity "
            f"ratio not distinguishable from 1.0 (exact) on {_units(tested)}"
            + (": " + "; ".join(exact_like) if exact_like else "")
            + "."
        )
    return findings


def _headline(table: pd.DataFrame) -> list[str]:
    lines = ["## Headline", ""]
    kinds = []
    perplexity = _perplexity_rows(table)
    if not perplexity.empty:
        kinds.append(
            perplexity.assign(
                measure=[f"perplexity ({_protocol_label(p)})" for p in perplexity["protocol"]],
                kv=_column(perplexity, "kv_compression_ratio"),
            )
        )
    compare = table[(table["workload"] == "real-model") & (table["mode"] == "compare")]
    if not compare.empty:
        kinds.append(
            compare.assign(
                measure="compare (teacher-forced)", kv=_column(compare, "quantized_kv.kv_compression_ratio")
            )
        )
    if not kinds:
        return [*lines, "No perplexity or real-model compare records: headline omitted.", ""]
    rows = pd.concat(kinds, ignore_index=True)
    keys = [
        "model",
        "setting",
        "bits",
        "key_strategy",
        "value_strategy",
        "key_bits",
        "value_bits",
        "residual_length",
        "exact_layers",
        "group_size",
        "protocol",
        "measure",
        "workload",
        *WINDOW_SET,
    ]
    quality = ["perplexity_ratio", "top1_agreement", "kl_divergence"]
    means = _decode_first(_mean_by(rows, keys, [*quality, "kv", "scored_tokens", "prompts"]))
    findings = _headline_findings(means)
    means = _with_errors(_with_cache_labels(means), quality)
    headers = {
        "model": "model",
        "bits": "bits",
        "keys": "keys",
        "values": "values",
        "residual_length": "residual",
        "exact_layers": "exact layers",
        "measure": "measured by",
        "perplexity_ratio": "perplexity ratio",
        "top1_agreement": "top-1 agreement",
        "kl_divergence": "KL",
        "kv": "KV compression",
        "records": "records",
    }
    return [
        *lines,
        "Per model and bit width: perplexity ratio (quantized / exact), top-1 agreement "
        "and KL(exact || quantized) of the next-token distribution, and KV-cache compression "
        "against fp32 (all stored bytes counted); the decode protocol leads. ± is one standard "
        "error with the text window as the unit for perplexity (section 3) and the prompt for "
        "compare mode (section 2b); a ratio is called distinguishable from exact when the 95% "
        "interval of its quantized - exact NLL difference per window (per prompt) excludes 0.",
        "",
        markdown_table(means, headers),
        "",
        *(_what_this_shows(findings) if findings else []),
    ]


def _notes(table: pd.DataFrame, windows: _WindowValues) -> list[str]:
    lines = ["## What these numbers mean (and do not)", "", HONEST_NOTE]
    perplexity = table[table["workload"] == "perplexity"]
    if not perplexity.empty:
        lines.append(f"- {_text_note(perplexity, windows)}")
    lines.append("")
    used = table.loc[table["workload"] == "perplexity", ["protocol"]].dropna().drop_duplicates()
    protocols = list(_decode_first(used.sort_values("protocol"))["protocol"])
    if protocols:
        lines.append(f"Perplexity protocol{'s' if len(protocols) > 1 else ''} used in this report:")
        lines += [f"- {PROTOCOL_NOTES.get(protocol, f'`{protocol}`')}" for protocol in protocols]
    else:
        lines.append("No perplexity records, so no perplexity protocol was used.")
    return [*lines, ""]


def write_report(
    table: pd.DataFrame,
    out: str | os.PathLike,
    title: str = "TurboQuant KV-cache evaluation",
    per_window: pd.DataFrame | None = None,
    key_stats: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write the markdown report and its PNG plots; return the report's path.

    ``out`` is the report file (``*.md``) or a directory for ``report.md``; plots go next to the
    report under fixed names (``distortion_vs_bits.png``, ``quality_trace.png``,
    ``quality_compare.png``, ``perplexity_vs_bits.png``, ``throughput.png``), each written only
    when its section has records. Sections: headline table, distortion, attention quality on
    traces, real-model compare, perplexity and KV memory, throughput, and what the numbers mean.
    Real-model figures are shown as "value ± SE" where the records carry standard errors with
    the window (perplexity) or the prompt (compare mode) as the unit, and plots draw their 95%
    error bars. ``per_window``: :func:`per_window_table` of the records (per_window.csv), from
    which findings compare two perplexity settings by their paired per-window differences
    (:func:`paired_nll`; without it, no two settings are told apart); a setting is compared with
    exact by its own standard error (:func:`_against_exact`). ``key_stats``: per-layer key
    statistics records (tq.tasks.key_stats), shown in the cross-model section with
    ``key_statistics.png``. Everything is written atomically.
    """
    out = Path(out)
    path = out if out.suffix == ".md" else out / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _typed(table.reindex(columns=[*COORDINATES, *table.columns.difference(COORDINATES, sort=False)]))
    table = _window_errors_only(table)
    windows = _WindowValues(per_window)
    counts = table.groupby(["source", "workload"], dropna=False).size()
    lines = [
        f"# {title}",
        "",
        f"Generated from {len(table)} result record{'s' if len(table) != 1 else ''}"
        + (
            ": " + ", ".join(f"{count} {workload}" for (_, workload), count in counts.items())
            if len(table)
            else ""
        )
        + ".",
        "",
    ]
    quality = _real_quality(table)  # the baselines and the ablations sections both read it
    for section in (
        _headline(table),
        _section_distortion(table, path.parent),
        _section_trace(table, path.parent),
        _section_compare(table, path.parent),
        _section_across_models(table, path.parent, windows, key_stats),
        _section_perplexity(table, windows),
        _section_throughput(table, path.parent),
        _section_layer_sensitivity(table, path.parent, windows),
        _section_baselines(quality, windows),
        _section_ablations(quality, windows),
        _section_needle(table, path.parent),
        _notes(table, windows),
    ):
        lines += section
    atomic_write_bytes(path, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return path

"""Reading result records (docs/design.md section 4) and checking their envelopes and per-window
values before anything is made of them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tq.tasks.records import SCHEMA, SOURCES
from tq.tasks.stats import PER_TOKEN_FIELDS

# The per-window figures of a perplexity record (``metrics.per_window``): each window's mean over
# its scored tokens, and how many it scored.
PER_WINDOW_FIELDS = ("tokens", "exact_nll", "quantized_nll", "kl", "top1_match", "delta_p", "delta_p_sq")


class RecordError(ValueError):
    """A result file is unreadable or not a ``tq.result/1`` record; the message names the file."""


def check_record(record: Any) -> str | None:
    """What is wrong with a parsed record, or None when its envelope (and its per-window values,
    :func:`_check_windows`) is valid."""
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


def has_windows(record: dict[str, Any]) -> bool:
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
    if not has_windows(record):
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
        problem = check_record(record)
        if problem:
            raise RecordError(f"{path}: not a result record: {problem}")
        records.append(record)
    return records

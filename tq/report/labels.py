"""How the report names cache settings, quantization methods and perplexity protocols, and the
order protocols are shown in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tq.cache.strategies import STRATEGIES
from tq.report.grouping import column_or_nan
from tq.report.markdown import format_cell, is_missing

# Cache settings other than the strategies that tell two lines of a quality plot apart.
LINE_SETTINGS = (
    "residual_length",
    "exact_layers",
    "renormalize",
    "norm_dtype",
    "rotation",
    "center_keys",
    "fp8_scale",
)
# Protocols in the order the report leads with them, and how the report names them.
PROTOCOL_ORDER = ("decode", "window")
PROTOCOL_LABELS = {"window": "window, quantized context only"}


def strategy_family(name: Any) -> str | None:
    """The family of a record's strategy (:data:`tq.cache.strategies.STRATEGIES`), or None for a
    name that is not one (a missing value: pandas probes row functions with an empty row)."""
    return STRATEGIES[name].family if name in STRATEGIES else None


def strategy_label(name: Any) -> str:
    """The report's name of a record's strategy ("TurboQuant MSE"), or the value as text."""
    return STRATEGIES[name].label if name in STRATEGIES else str(name)


def protocol_label(protocol: Any) -> str:
    """A perplexity protocol as the report names it ("window, quantized context only")."""
    return PROTOCOL_LABELS.get(protocol, format_cell(protocol))


def decode_first(table: pd.DataFrame) -> pd.DataFrame:
    """The rows reordered, stably, so that the decode protocol leads, then window, then the rest
    (rows without a protocol last)."""
    protocols = column_or_nan(table, "protocol")
    rank = [
        PROTOCOL_ORDER.index(p) if not is_missing(p) and p in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
        for p in protocols
    ]
    return table.iloc[np.argsort(rank, kind="stable")]


def stream_label(row: pd.Series, part: str) -> str:
    """A stream in words: "mse 3", "exact", or for a baseline with its group size "kivi 2 g32"."""
    strategy = row[f"{part}_strategy"]
    family = strategy_family(strategy)
    if family == "exact":
        return strategy
    text = f"{strategy} {format_cell(row[f'{part}_bits'])}"
    if family == "uniform" and pd.notna(row.get("group_size")):  # a baseline
        text += f" g{format_cell(row['group_size'])}"
    if family == "fp8" and row.get("fp8_scale") == "head":
        text += " per-head scale"
    if part == "key" and not is_missing(row.get("center_keys")) and bool(row["center_keys"]):
        text += " centred"
    return text


def with_cache_labels(means: pd.DataFrame) -> pd.DataFrame:
    """Add ``keys`` and ``values`` columns such as "mse 3" or "exact" for the tables."""
    return means.assign(
        keys=means.apply(stream_label, axis=1, part="key"),
        values=means.apply(stream_label, axis=1, part="value"),
    )


def line_label(row: pd.Series, settings: Sequence[str]) -> str:
    """A plot line's legend: "K mse / V mse", then each column of ``settings`` as name=value."""
    label = f"K {row['key_strategy']} / V {row['value_strategy']}"
    extras = [f"{name}={format_cell(row[name])}" for name in settings]
    return ", ".join([label, *extras])


def setting_in_words(row: pd.Series) -> str:
    """A cache setting in words for the findings: "K mse 3 / V mse 3", with any exact residual
    window or exact layers."""
    text = f"K {stream_label(row, 'key')} / V {stream_label(row, 'value')}"
    if pd.notna(row.get("residual_length")) and row["residual_length"] > 0:
        text += f", last {format_cell(row['residual_length'])} tokens exact"
    if pd.notna(row.get("exact_layers")) and row["exact_layers"] != "none":
        text += f", layers {row['exact_layers']} exact"
    if not is_missing(row.get("setting")):
        text = f"{row['setting']} ({text})"
    return text


def setting_label(row: pd.Series) -> str:
    """A row's short name: the sweep's label of its setting, else its strategies in words."""
    return str(row["setting"]) if not is_missing(row.get("setting")) else setting_in_words(row)


def method_name(row: pd.Series) -> str:
    """The quantization method of a cache setting: "TurboQuant MSE", "KIVI-style", or for mixed
    streams "TurboQuant Prod keys + TurboQuant MSE values" (the strategies' labels,
    :data:`tq.cache.strategies.STRATEGIES`)."""
    keys, values = (strategy_label(row[f"{part}_strategy"]) for part in ("key", "value"))
    return keys if keys == values else f"{keys} keys + {values} values"

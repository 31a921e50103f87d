"""The rows of the summary table that the sections read, by workload."""

from __future__ import annotations

import pandas as pd

from tq.report.grouping import column_or_nan


def synthetic_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The records of the synthetic unit-vector benchmark."""
    return table[table["workload"] == "synthetic"]


def compare_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The real-model records of compare mode (teacher-forced against the exact run)."""
    return table[(table["workload"] == "real-model") & (table["mode"] == "compare")]


def perplexity_rows(table: pd.DataFrame, per_layer: bool = False) -> pd.DataFrame:
    """Perplexity records of cache settings (whole model), or with ``per_layer`` those of the
    per-layer sensitivity (one layer quantized)."""
    rows = table[table["workload"] == "perplexity"]
    one_layer = column_or_nan(rows, "quantized_layers").notna()
    return rows[one_layer] if per_layer else rows[~one_layer]
